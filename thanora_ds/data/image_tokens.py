"""How many tokens an image expands to, from the processor's configuration where that number is fixed.

LLaVA-1.5 (`LlavaProcessor` with a CLIP image processor) resizes and centre-crops every image to the same
`crop_size`, so every image gives the same number of features: (H // patch) * (W // patch) patches, plus
`num_additional_image_tokens` (CLIP's CLS), minus one for `vision_feature_select_strategy: default` (which drops
CLS): 576 for 336 px and patch 14. That is exactly `LlavaProcessor.replace_image_token`'s formula applied to the
size of the pixel values it produced; here the size is read from the configuration instead of from an image
that had to be decoded and preprocessed (about 64 ms per 640x480 JPEG on these CPUs: hours for LLaVA-665K).

Where the count is *not* fixed, `fixed_image_token_count` returns None with the reason, and encoding keeps the
per-image path (the processor's real call on the decoded image): LLaVA-NeXT / OneVision (anyres tiling: the count
depends on the image's size), an image processor that resizes without a fixed output size, any processor class
this module does not know the formula of. The formula is never trusted blindly either: `Encoder` compares it with
the processor's real expansion of the first image it meets, and a difference is an error (a wrong formula fails
loudly instead of mislabelling every example).
"""

from __future__ import annotations

from typing import Optional

# processor classes whose `replace_image_token` is the fixed-size formula above (the count depends only on the
# pixel values' height and width). LlavaNextProcessor, LlavaOnevisionProcessor... are deliberately absent.
_FORMULA_CLASSES = ("LlavaProcessor",)


def _fixed_output_size(image_processor) -> tuple[Optional[tuple[int, int]], str]:
    """(height, width) every image is brought to by this image processor, or (None, why not)."""
    def hw(d) -> Optional[tuple[int, int]]:
        if d is None:
            return None
        d = d if isinstance(d, dict) else getattr(d, "__dict__", {})
        h, w = d.get("height"), d.get("width")
        return (int(h), int(w)) if isinstance(h, int) and isinstance(w, int) else None

    if getattr(image_processor, "do_center_crop", False):
        size = hw(getattr(image_processor, "crop_size", None))
        if size:
            return size, ""
        return None, "centre crop without a fixed crop_size"
    if getattr(image_processor, "do_resize", False):
        size = hw(getattr(image_processor, "size", None))
        if size:
            return size, ""
    return None, (f"{type(image_processor).__name__} has no fixed output size (no centre crop, and its resize "
                  "keeps the aspect ratio)")


def fixed_image_token_count(processor) -> tuple[Optional[int], str]:
    """(tokens per image, "") where the processor's configuration fixes that number, else (None, why not)."""
    if processor is None:
        return None, "no processor"
    name = type(processor).__name__
    if name not in _FORMULA_CLASSES:
        return None, f"{name}: the number of image tokens is not known to be fixed (e.g. anyres tiling)"
    patch = getattr(processor, "patch_size", None)
    strategy = getattr(processor, "vision_feature_select_strategy", None)
    if not isinstance(patch, int) or patch < 1:
        return None, f"{name}.patch_size is {patch!r}"
    if strategy not in ("default", "full"):
        return None, f"{name}.vision_feature_select_strategy is {strategy!r}"
    size, why = _fixed_output_size(processor.image_processor)
    if size is None:
        return None, why
    extra = getattr(processor, "num_additional_image_tokens", 0) or 0
    count = (size[0] // patch) * (size[1] // patch) + int(extra) - (1 if strategy == "default" else 0)
    if count < 1:
        return None, f"the configuration gives {count} image tokens"
    return count, ""
