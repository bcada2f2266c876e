"""Tiny tokenizer and LLaVA processor built offline for tests (no hub access).

The tokenizer is a SentencePiece BPE model (vocab 1000, byte fallback, so any text encodes)
trained in well under a second on a fixed synthetic corpus, loaded through the real
`LlamaTokenizer.from_pretrained` path (the bare constructor builds a tokenizer that encodes
everything to []), given ChatML special tokens, a pad token and a ChatML-like chat template with
a fixed default system prompt (like SmolLM2's), then saved and loaded back with
`AutoTokenizer.from_pretrained`, so tests exercise real loading code.

Models built for these assets: vocab `len(tokenizer)` (1003, 1004 with `<image>`); LLaVA vision
tower image_size 28, patch 14, `vision_feature_select_strategy="default"`: a 28x28 image gives
(28/14)^2 = 4 patch features (the CLS feature is dropped), hence `num_additional_image_tokens=1`
and 4 `<image>` tokens per image.
"""

from __future__ import annotations

import io
import os
import random

SYSTEM_PROMPT = "You are a helpful assistant."

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Same, but a message's content may be a list of {"type": "image"} / {"type": "text"} parts.
MM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IMAGE_SIZE = 28
PATCH_SIZE = 14
IMAGE_TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 4


def _corpus() -> list[str]:
    """Fixed text: chat words used by the tests, plus pseudo-words so BPE reaches 1000 pieces."""
    rng = random.Random(1234)
    syllables = ["ka", "to", "ri", "mu", "sen", "la", "pe", "do", "vi", "na", "gor", "bel", "tri",
                 "xa", "qui", "zo", "ful", "han", "mir", "ost", "ep", "ul", "ra", "ne"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    common = [
        "system user assistant", SYSTEM_PROMPT, "What is the capital of France?", "Paris.",
        "Describe the image.", "A red square.", "What color is the shape?", "It is blue.",
        "Translate to French: cat", "chat", "Add 2 and 3.", "The answer is 5.", "yes no maybe",
        "Hello world, how are you today? I am fine, thank you.",
    ]
    return common * 30 + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]


def _train_sentencepiece(path: str) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # keep newlines and spaces as they are (chat templates)
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())


def make_llama_tokenizer(dir: str | os.PathLike):
    """Train, save to DIR and load back a tiny LLaMA tokenizer with a ChatML chat template.

    bos `<s>` (not emitted by the template), eos `<|im_end|>`, pad `<pad>` (distinct from eos).
    """
    from transformers import AutoTokenizer, LlamaTokenizer

    dir = os.fspath(dir)
    os.makedirs(dir, exist_ok=True)
    _train_sentencepiece(os.path.join(dir, "tokenizer.model"))
    tok = LlamaTokenizer.from_pretrained(dir)
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(dir)
    return AutoTokenizer.from_pretrained(dir)


# The shape of llava-hf/llava-1.5-*-hf's template: "USER: <image>\n... ASSISTANT: answer " with no end-of-sequence
# token after the answer (the trainer must append one).
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def make_llava_processor(dir: str | os.PathLike, chat_template: str | None = None):
    """A LlavaProcessor (tiny tokenizer + `<image>` special token + 28x28 CLIP image processor),
    saved to DIR and loaded back with `AutoProcessor.from_pretrained`."""
    from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor

    dir = os.fspath(dir)
    tok = make_llama_tokenizer(dir)
    tok.add_tokens(["<image>"], special_tokens=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS feature, which "default" drops again
        chat_template=chat_template or MM_CHAT_TEMPLATE,
    )
    processor.save_pretrained(dir)
    return AutoProcessor.from_pretrained(dir)
