"""Each input format -> expected input ids and labels, with the tiny LLaMA tokenizer and LLaVA
processor. Expectations are written as the literal ChatML text the template must produce and the
literal answer text the labels must decode to, plus the fixed special-token ids; so the check does
not depend on which BPE merges SentencePiece learned."""

import json

import pytest
import torch
from PIL import Image

from thanora_ds.data import IGNORE_INDEX as IGNORE, DataConfig, SourceConfig, build_multitask_data, collate_batch
from tiny_assets import IMAGE_TOKENS_PER_IMAGE, make_llama_tokenizer, make_llava_processor

PAD, IM_START, IM_END, IMAGE, NL = 1000, 1001, 1002, 1003, 13  # fixed by how tiny_assets adds them
SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_llama_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return make_llava_processor(tmp_path_factory.mktemp("proc"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build(tmp_path, rows, fmt="auto", tokenizer=None, processor=None, **kw):
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(sources=[SourceConfig(src, fmt)], image_folder=str(tmp_path), preview_samples=0, eval_samples=0, **kw)
    return build_multitask_data(cfg, tokenizer=tokenizer, processor=processor)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def check_single_turn(tok, ex, prompt_text, answer_text):
    """input ids == tokens of the literal conversation; labels == -100 over the prompt, then the answer."""
    p = ids_of(tok, prompt_text)
    assert ex["input_ids"] == ids_of(tok, prompt_text + answer_text)
    assert ex["labels"][: len(p)] == [-100] * len(p)
    assert ex["labels"][len(p):] == ex["input_ids"][len(p):]
    assert tok.decode(ex["labels"][len(p):]) == answer_text
    assert ex["input_ids"][0] == IM_START and ex["input_ids"][-2:] == [IM_END, NL]


PROMPT = SYS + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
ANSWER = "Paris.<|im_end|>\n"
QA = {"q": "What is the capital of France?", "a": "Paris."}


@pytest.mark.parametrize(
    "fmt,row",
    [
        ("prompt_response", {"prompt": QA["q"], "response": QA["a"], "task": "qa"}),
        ("chat", {"messages": [{"role": "user", "content": QA["q"]}, {"role": "assistant", "content": QA["a"]}], "task": "qa"}),
        ("llava", {"id": "x1", "conversations": [{"from": "human", "value": QA["q"]}, {"from": "gpt", "value": QA["a"]}], "task": "qa"}),
    ],
)
@pytest.mark.parametrize("auto", [False, True])
def test_each_format_llama_tokenizer(tmp_path, tok, fmt, row, auto):
    data = build(tmp_path, [row], "auto" if auto else fmt, tokenizer=tok)
    assert data.tasks == ["qa"]
    ex = data.train["qa"][0]
    check_single_turn(tok, ex, PROMPT, ANSWER)
    assert ex["task_id"] == 0 and "pixel_values" not in ex
    assert ex["id"] == ("x1" if fmt == "llava" else "d.jsonl#1")


def test_each_format_llava_processor_text_only(tmp_path, proc):
    rows = [
        {"prompt": QA["q"], "response": QA["a"], "task": "a"},
        {"messages": [{"role": "user", "content": QA["q"]}, {"role": "assistant", "content": QA["a"]}], "task": "b"},
        {"conversations": [{"from": "human", "value": QA["q"]}, {"from": "gpt", "value": QA["a"]}], "task": "c"},
    ]
    data = build(tmp_path, rows, processor=proc)
    for t in ("a", "b", "c"):
        ex = data.train[t][0]
        check_single_turn(proc.tokenizer, ex, PROMPT, ANSWER)
        assert "pixel_values" not in ex


def test_llava_image_expands_to_image_tokens(tmp_path, proc):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "red.png")
    row = {"id": "img1", "image": "red.png", "task": "vqa", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red square."}]}
    ex = build(tmp_path, [row], processor=proc).train["vqa"][0]
    tok = proc.tokenizer
    prompt = SYS + "<|im_start|>user\n" + "<image>" * IMAGE_TOKENS_PER_IMAGE + "\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    answer = "A red square.<|im_end|>\n"
    check_single_turn(tok, ex, prompt, answer)
    assert ex["input_ids"].count(IMAGE) == IMAGE_TOKENS_PER_IMAGE
    first = ex["input_ids"].index(IMAGE)
    assert ex["input_ids"][first : first + IMAGE_TOKENS_PER_IMAGE] == [IMAGE] * IMAGE_TOKENS_PER_IMAGE
    assert tuple(ex["pixel_values"].shape) == (1, 3, 28, 28)
    # the pixel values are the processor's own output for that image
    ref = proc(text=["<image>"], images=[Image.open(tmp_path / "red.png").convert("RGB")], return_tensors="pt")["pixel_values"]
    assert torch.allclose(torch.as_tensor(ex["pixel_values"]), torch.as_tensor(ref))


def test_llava_image_list_and_collate(tmp_path, proc):
    for name, color in (("r.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (28, 28), color).save(tmp_path / name)
    rows = [
        {"id": "two", "image": ["r.png", "b.png"], "task": "vqa", "conversations": [
            {"from": "human", "value": "<image> and <image>: which is blue?"}, {"from": "gpt", "value": "The second."}]},
        {"id": "txt", "task": "vqa", "conversations": [
            {"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]},
    ]
    data = build(tmp_path, rows, processor=proc)
    exs = list(data.train["vqa"])
    two = next(e for e in exs if e["id"] == "two")
    assert two["input_ids"].count(IMAGE) == 2 * IMAGE_TOKENS_PER_IMAGE
    assert all(l == -100 for i, l in zip(two["input_ids"], two["labels"]) if i == IMAGE)
    assert tuple(two["pixel_values"].shape) == (2, 3, 28, 28)
    batch = collate_batch(exs, data.pad_token_id)
    assert tuple(batch["pixel_values"].shape) == (2, 3, 28, 28)
    assert (batch["input_ids"] == IMAGE).sum() == 2 * IMAGE_TOKENS_PER_IMAGE


def test_multi_turn_chat_labels_every_assistant_turn_only(tmp_path, tok):
    row = {"task": "math", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Add 2 and 4."}, {"role": "assistant", "content": "6"}]}
    ex = build(tmp_path, [row], tokenizer=tok).train["math"][0]
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n"  # own system turn replaces the default one
            "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
            "<|im_start|>user\nAdd 2 and 4.<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n")
    assert ex["input_ids"] == ids_of(tok, text)
    spans, cur = [], []
    for i, l in zip(ex["input_ids"], ex["labels"]):
        if l == -100:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert l == i
            cur.append(l)
    spans.append(cur)
    assert [tok.decode(s) for s in spans] == ["5<|im_end|>\n", "6<|im_end|>\n"]


def test_truncation_keeps_the_prompt_and_part_of_the_answer(tmp_path, tok):
    long_answer = " ".join(["Paris."] * 50)
    row = {"prompt": QA["q"], "response": long_answer, "task": "qa"}
    n_prompt = len(ids_of(tok, PROMPT))
    data = build(tmp_path, [row], tokenizer=tok, max_length=n_prompt + 5)
    ex = data.train["qa"][0]
    assert len(ex["input_ids"]) == len(ex["labels"]) == n_prompt + 5
    assert ex["labels"][:n_prompt] == [-100] * n_prompt and -100 not in ex["labels"][n_prompt:]
    assert data.truncated == {"qa": 1}


def test_collate_right_pads_and_masks(tmp_path, tok):
    rows = [{"prompt": "Hi", "response": "yes", "task": "a"},
            {"prompt": QA["q"], "response": "The answer is 5.", "task": "b"}]
    data = build(tmp_path, rows, tokenizer=tok)
    exs = [data.train_example(0, 0), data.train_example(1, 0)]
    b = collate_batch(exs, data.pad_token_id)
    n0, n1 = len(exs[0]["input_ids"]), len(exs[1]["input_ids"])
    assert n0 < n1 and b["input_ids"].shape == (2, n1)
    assert b["input_ids"][0, n0:].eq(PAD).all() and b["labels"][0, n0:].eq(-100).all()
    assert b["attention_mask"].sum(1).tolist() == [n0, n1]
    assert b["labels"][0, :n0].tolist() == exs[0]["labels"]
    assert b["task_ids"].tolist() == [0, 1] and b["task_ids"].dtype == torch.long
    assert "pixel_values" not in b


def test_streaming_reads_the_same_examples(tmp_path, tok):
    rows = [{"prompt": f"Add {i} and 3.", "response": str(i + 3), "task": "add" if i % 2 else "say"} for i in range(12)]
    a = build(tmp_path, rows, tokenizer=tok)
    b = build(tmp_path, rows, tokenizer=tok, streaming=True)
    for split in ("train", "preview", "eval"):
        for t in a.tasks:
            assert list(getattr(a, split)[t]) == list(getattr(b, split)[t])


def test_llava_hf_template_answers_end_with_a_learned_eos(tmp_path):
    """llava-hf's template puts no end-of-sequence token after an answer; LLaVA's recipe ends every answer with
    EOS. The encoder appends it, labelled, so the loss counts it and the model learns to stop."""
    from thanora_ds.trainer import token_losses
    from tiny_assets import LLAVA_HF_CHAT_TEMPLATE
    processor = make_llava_processor(tmp_path / "hf", chat_template=LLAVA_HF_CHAT_TEMPLATE)
    Image.new("RGB", (28, 28), (0, 0, 255)).save(tmp_path / "sq.png")
    rows = [{"id": "q", "image": "sq.png", "task": "look", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A blue square."},
        {"from": "human", "value": "Blue?"}, {"from": "gpt", "value": "yes"}]}]
    data = build(tmp_path, rows, processor=processor)
    ex = data.train["look"][0]
    eos = processor.tokenizer.eos_token_id
    spans, current = [], []
    for t, l in zip(ex["input_ids"], ex["labels"]):
        if l != IGNORE:
            current.append(l)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    assert len(spans) == 2 and all(span[-1] == eos for span in spans)  # each answer ends with a labelled EOS
    texts = [processor.tokenizer.decode(span[:-1]).strip() for span in spans]
    assert texts == ["A blue square.", "yes"]
    # the loss counts the EOS positions: a target equal to EOS is among the valid label tokens
    batch = collate_batch([ex], data.pad_token_id)
    logits = torch.zeros(1, batch["input_ids"].shape[1], len(processor.tokenizer))
    losses = token_losses(logits, batch["labels"])
    targets = batch["labels"][0, 1:]
    assert int((targets == eos).sum()) == 2 and bool((losses[0][targets == eos] > 0).all())
    # ChatML answers already end with <|im_end|>: nothing is appended there
    chatml = build(tmp_path, [{"id": "c", "task": "t", "prompt": "hi", "response": "yo"}], tokenizer=processor.tokenizer)
    labels = [l for l in chatml.train["t"][0]["labels"] if l != IGNORE]
    assert labels.count(IM_END) == 1 and eos not in labels[:-1]


def llava_expand2square(pil_img, background_color):
    """LLaVA-1.5's own expand2square (llava/mm_utils.py), written out independently for the comparison."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


@pytest.mark.parametrize("size", [(56, 20), (18, 50), (30, 30)])
def test_pad_to_square_equals_llava_expand2square_then_the_processor(tmp_path, proc, size):
    import numpy as np
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / "w.png")
    rows = [{"id": "w", "image": "w.png", "task": "look",
             "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "noise"}]}]
    padded = build(tmp_path, rows, processor=proc, image_aspect_ratio="pad").train["look"][0]["pixel_values"]
    cropped = build(tmp_path, rows, processor=proc).train["look"][0]["pixel_values"]
    background = tuple(int(x * 255) for x in proc.image_processor.image_mean)
    expected = proc.image_processor(images=[llava_expand2square(Image.open(tmp_path / "w.png").convert("RGB"), background)],
                                    return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(padded, expected, atol=1e-6, rtol=0)
    assert torch.equal(padded, cropped) == (size[0] == size[1])  # only a non-square image changes
