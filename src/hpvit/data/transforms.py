"""Train / eval transforms (timm's ``create_transform``) and mixup/cutmix, all set by the recipe."""

from __future__ import annotations

from timm.data import Mixup, create_transform


def build_transform(recipe, train: bool, img_size: int | None = None):
    size = img_size or recipe.img_size
    if train:
        return create_transform(
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
