"""Train / eval transforms (timm's ``create_transform``) and mixup/cutmix, all set by the recipe."""

from __future__ import annotations

from PIL import Image, ImageOps
from timm.data import Mixup, create_transform


def _posterize_zero_safe(img, bits, **_):
    """timm's posterize, also for 0 bits kept: Pillow < 11 returned a black image, newer Pillow raises."""
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


def _patch_posterize(transform) -> None:
    """RandAugment at high magnitude (e.g. m9 + mstd 0.5 reaching 10) asks Pillow to keep 0 bits, which
    Pillow >= 11 rejects with "bits must be between or equal to 1 and 8"; restore the old behaviour."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize_zero_safe


def build_transform(recipe, train: bool, img_size: int | None = None):
    size = img_size or recipe.img_size
    if train:
        tf = create_transform(
            input_size=size,
            is_training=True,
            scale=tuple(recipe.scale),
            color_jitter=recipe.color_jitter if recipe.color_jitter is not None else 0.0,
            auto_augment=recipe.auto_augment,
            interpolation=recipe.interpolation,
            re_prob=recipe.reprob,
            re_mode=recipe.remode,
            re_count=recipe.recount,
            mean=tuple(recipe.mean),
            std=tuple(recipe.std),
        )
        _patch_posterize(tf)
        return tf
    return create_transform(
        input_size=size,
        is_training=False,
        interpolation=recipe.interpolation,
        crop_pct=recipe.crop_pct,
        mean=tuple(recipe.mean),
        std=tuple(recipe.std),
    )


def build_mixup(recipe, num_classes: int) -> Mixup | None:
    """timm's Mixup (mixup + cutmix + label smoothing) or None when both alphas are 0."""
    if recipe.mixup <= 0 and recipe.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=recipe.mixup,
        cutmix_alpha=recipe.cutmix,
        prob=recipe.mixup_prob,
        switch_prob=recipe.mixup_switch_prob,
        mode="batch",
        label_smoothing=recipe.smoothing,
        num_classes=num_classes,
    )
