"""Turn a `Record` into model inputs with the model's own chat template.

Labels: only the assistant turns are learned (-100 elsewhere). The span of assistant turn k is
found by rendering the conversation up to the turn before it with the generation prompt, and up
to and including it, and tokenizing both: the tokens between the two lengths are the answer
(with whatever end-of-turn tokens the template puts after it, so the model learns to stop). This
works for any chat template without `{% generation %}` markers, provided the template renders
each conversation prefix as a text prefix that tokenizes to a token prefix; that is checked for
every record, never assumed.

LLaVA: the processor's template renders `<image>` (one token), the tokenizer gives the labels on
that unexpanded sequence, then each image token is expanded to the number of features the vision
tower yields; labels are carried over token by token (image tokens get -100). Where the processor's
configuration fixes that number (LLaVA-1.5; `image_tokens.py`) the expansion is done from it without
decoding any image, after checking it once, on the first image record, against the processor's own
expansion (identical token ids and labels, or an error). Otherwise (anyres, sizes that vary) every
image is decoded and the processor itself expands it, and the non-image tokens of both sequences are
checked to be identical. Pixel values are not kept here: `ExampleList` computes them on access (as
LLaVA's own lazy dataset does), so memory holds token ids only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import DataValidationError, Problem, RecordProblem
from .image_tokens import fixed_image_token_count
from .records import IMAGE_PLACEHOLDER, Record

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    content_start: int = 0  # tokens of the record's own leading system turn (not content for HASI, METHOD.md 2.2)


class Encoder:
    """Encodes records for one tokenizer (text models) or processor (LLaVA-style models)."""

    def __init__(self, tokenizer=None, processor=None, max_length: int = 512, pad_to_square: bool = False):
        if tokenizer is None and processor is None:
            raise ValueError("build_multitask_data needs a tokenizer or a processor")
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else processor.tokenizer
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        self.image_token_id: Optional[int] = None
        if processor is not None:
            self.image_token_id = getattr(processor, "image_token_id", None)
            if self.image_token_id is None:
                self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        # tokens per image from the processor's configuration (None: not fixed, each image through the processor),
        # trusted only once the processor's real expansion of one record agreed with it
        self.image_tokens, self.image_tokens_reason = fixed_image_token_count(processor)
        self.image_tokens_checked = False
        renderer = processor if processor is not None and getattr(processor, "chat_template", None) else self.tokenizer
        if not getattr(renderer, "chat_template", None):
            raise ValueError("the tokenizer/processor has no chat_template; set one (Jinja) before building data")
        self._renderer = renderer
        self._default_system: Optional[str] = None

    # -- rendering -------------------------------------------------------------------------------

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.processor is not None and self._renderer is self.processor:
            messages = [_as_parts(m) for m in messages]
        text = self._renderer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text if isinstance(text, str) else text[0]

    def _tokenize(self, text: str) -> list[int]:
        # the template already holds every special token it wants (BOS included, if any)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- encoding --------------------------------------------------------------------------------

    def encode(self, rec: Record) -> Encoded:
        """Input ids and labels for `rec`, truncated to max_length. Raises RecordProblem."""
        if rec.images and self.processor is None:
            raise RecordProblem("image", "record has images but no processor was given (text-only model?)")
        msgs = rec.messages
        full_text = self._render(msgs, add_generation_prompt=False)
        ids = self._tokenize(full_text)
        labels = [IGNORE_INDEX] * len(ids)
        first_answer_field = None
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            first_answer_field = first_answer_field or rec.field_of(k)
            start = self._prefix_len(msgs[:k], True, full_text, ids, rec, k)
            end = self._prefix_len(msgs[: k + 1], False, full_text, ids, rec, k) if k + 1 < len(msgs) else len(ids)
            if end <= start:
                raise RecordProblem(rec.field_of(k), "the chat template rendered this assistant turn as no tokens")
            labels[start:end] = ids[start:end]
        if rec.images:
            ids, labels = self._expand_images(full_text, ids, labels, rec)
        ids, labels = self._end_answers(ids, labels)
        first_label = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
        if first_label >= self.max_length:
            raise RecordProblem(
                first_answer_field,
                f"the prompt alone is {first_label} tokens >= max_length {self.max_length}: no label would remain",
            )
        truncated = len(ids) > self.max_length
        if truncated:
            if self.image_token_id is not None and self.image_token_id in ids[self.max_length :]:
                raise RecordProblem(
                    "image",
                    f"{len(ids)} tokens > max_length {self.max_length} and truncation would cut image tokens",
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Encoded(ids, labels, truncated, min(self._system_length(msgs, full_text, ids), len(ids)))

    def _system_length(self, msgs: list[dict], full_text: str, ids: list[int]) -> int:
        """Tokens of the leading system block as the template renders it: the record's own system turn rendered
        alone, or, for a record without one, the block the template adds by itself (``default_system_text``).
        0 where there is none, and for templates that fold the system prompt into the first user turn
        (Llama-2, Mistral): there it has no separate block, rendering it alone fails or is no prefix, and its
        tokens stay content."""
        if not msgs or len(msgs) < 2:
            return 0
        if msgs[0]["role"] != "system":
            text = self.default_system_text()
        else:
            try:
                text = self._render(msgs[:1], add_generation_prompt=False)
            except Exception:  # noqa: BLE001 - a template may refuse a system-only conversation
                return 0
        if not text or not full_text.startswith(text):
            return 0
        sys_ids = self._tokenize(text)
        return len(sys_ids) if ids[: len(sys_ids)] == sys_ids else 0

    def default_system_text(self) -> str:
        """The system block the template renders for a conversation that has none (SmolLM2's and Qwen2's default
        system prompt, Llama-3's date header), found once: a user turn rendered alone, less the text the same
        user turn renders after an explicit system turn. '' when the template adds none or folds the system
        prompt into the user turn. It is left out of HASI's statistics like a record's own system turn: in a
        mixture where some tasks bring their own system prompt it is not part of the common prefix, and it
        measures the template, not the task."""
        if self._default_system is None:
            self._default_system = ""
            user = [{"role": "user", "content": "Probe question?"}]
            system = [{"role": "system", "content": "Probe system prompt."}]
            try:
                alone, with_system = self._render(user, False), self._render(system + user, False)
                system_block = self._render(system, False)
            except Exception:  # noqa: BLE001 - a template may refuse a system-only conversation: no block
                return ""
            user_part = with_system[len(system_block):] if with_system.startswith(system_block) else ""
            if user_part and alone.endswith(user_part):
                self._default_system = alone[: len(alone) - len(user_part)]
        return self._default_system

    def _end_answers(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """An answer the template ends with no special token (llava-hf's `USER: ... ASSISTANT: answer `) gets the
        tokenizer's EOS appended, labelled, so that the model learns to stop, as LLaVA's own recipe does; an answer
        ending with the template's end-of-turn token (ChatML's <|im_end|>) is left as it is."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            return ids, labels
        special = set(self.tokenizer.all_special_ids)
        out_ids, out_labels, has_special = [], [], False
        for i, (t, l) in enumerate(zip(ids, labels)):
            out_ids.append(t)
            out_labels.append(l)
            if l == IGNORE_INDEX:
                continue
            has_special |= t in special
            if i + 1 == len(labels) or labels[i + 1] == IGNORE_INDEX:  # the last token of an answer
                if not has_special:
                    out_ids.append(eos)
                    out_labels.append(eos)
                has_special = False
        return out_ids, out_labels

    def _prefix_len(self, prefix_msgs, gen_prompt, full_text, full_ids, rec: Record, k: int) -> int:
        text = self._render(prefix_msgs, add_generation_prompt=gen_prompt) if prefix_msgs or gen_prompt else ""
        if not full_text.startswith(text):
            raise RecordProblem(
                rec.field_of(k),
                "the chat template does not render this conversation's prefix as a prefix of the whole "
                "(labels cannot be placed); use a prefix-stable template",
            )
        ids = self._tokenize(text) if text else []
        if full_ids[: len(ids)] != ids:
            raise RecordProblem(
                rec.field_of(k),
                "the conversation prefix tokenizes differently inside the whole text (token merge across "
                "the turn boundary); labels cannot be placed",
            )
        return len(ids)

    def _expand_images(self, full_text: str, ids: list[int], labels: list[int], rec: Record):
        if self.image_tokens is not None and self.image_tokens_checked:
            return self._expand_by_count(ids, labels, rec)
        expanded, new_labels = self._expand_by_processor(full_text, ids, labels, rec)
        if self.image_tokens is not None:  # the first image record: the configured count against the real one
            if self._expand_by_count(ids, labels, rec) != (expanded, new_labels):
                real = expanded.count(self.image_token_id) / max(1, ids.count(self.image_token_id))
                raise ValueError(
                    f"{self.image_tokens} image tokens per image from the processor's configuration, but the processor "
                    f"itself expands an image to {real:g} ({rec.source}, id={rec.id!r}): thanora_ds/data/"
                    f"image_tokens.py gets {type(self.processor).__name__} wrong; nothing was labelled with it")
            self.image_tokens_checked = True
        return expanded, new_labels

    def _expand_by_count(self, ids: list[int], labels: list[int], rec: Record):
        tok, n = self.image_token_id, self.image_tokens
        if ids.count(tok) != len(rec.images):
            raise RecordProblem("image", f"the template rendered {ids.count(tok)} image token(s) for "
                                         f"{len(rec.images)} image(s)")
        out_ids, out_labels = [], []
        for t, label in zip(ids, labels):
            if t == tok:
                out_ids += [tok] * n
                out_labels += [IGNORE_INDEX] * n
            else:
                out_ids.append(t)
                out_labels.append(label)
        return out_ids, out_labels

    def _expand_by_processor(self, full_text: str, ids: list[int], labels: list[int], rec: Record):
        try:
            images = [load_image(p, self.processor, self.pad_to_square) for p in rec.images]
        except ImageDecodeError as err:
            raise RecordProblem("image", str(err)) from None
        out = self.processor(text=[full_text], images=images, add_special_tokens=False)
        expanded = list(out["input_ids"][0])
        tok = self.image_token_id
        if [t for t in expanded if t != tok] != [t for t in ids if t != tok]:
            raise RecordProblem("image", "the processor's token ids differ from the tokenizer's beyond image tokens")
        it = iter(l for t, l in zip(ids, labels) if t != tok)
        new_labels = [IGNORE_INDEX if t == tok else next(it) for t in expanded]
        return expanded, new_labels


def _as_parts(m: dict) -> dict:
    """Message with `<image>` placeholders as content parts, the form processor templates expect."""
    parts = []
    for j, piece in enumerate(m["content"].split(IMAGE_PLACEHOLDER)):
        if j > 0:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return {"role": m["role"], "content": parts}


class ImageDecodeError(ValueError):
    pass


def expand_to_square(image, background: tuple[int, ...]):
    """LLaVA-1.5's ``expand2square``: the image centred on a square canvas of its longer side, in ``background``."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_image(path: str, processor=None, pad_to_square: bool = False):
    """The RGB image of ``path`` (padded to a square with the image processor's mean colour when asked)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for broken files
        raise ImageDecodeError(f"image could not be decoded ({type(e).__name__}: {e}): {path}") from None
    if pad_to_square:
        mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        image = expand_to_square(image, tuple(int(m * 255) for m in mean))  # as LLaVA: truncated, not rounded
    return image


def pixel_values_for(processor, image_paths: list[str], pad_to_square: bool = False):
    """Pixel values for the images of one example ([n_images, C, H, W] tensor). An image that was valid at
    validation but cannot be decoded now (changed on disk) is a DataValidationError naming the file."""
    try:
        images = [load_image(p, processor, pad_to_square) for p in image_paths]
    except ImageDecodeError as err:
        raise DataValidationError([Problem(file=str(err).rsplit(": ", 1)[-1], field="image", message=str(err))]) from None
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
