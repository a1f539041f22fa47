"""``hpvit info``: the per-stage table of a transformed model (blocks, tokens, window, dim, params, GFLOPs) and,
with ``--data``, its similarity to the plain model stage by stage.

It takes plain checkpoints and every file hpvit writes (classifier or backbone, detector, segmenter): a saved file
is described with its own stored config and the reuse report recorded when it was converted."""

from __future__ import annotations

from ..errors import ConfigError
from .common import Steps, add_common_model_args, add_model_positional, add_old_names, parse_key_values
from .source import build_model, saved_backbone


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="per-stage table: blocks, tokens, window, dim, params, GFLOPs")
    add_model_positional(p, "plain checkpoint, a file hpvit wrote (classifier, detector, segmenter), or timm:<model name>")
    add_common_model_args(p, config_default=None)
    p.add_argument("--img-size", type=int, default=224, help="input side the table is computed for (default 224)")
    p.add_argument("--data", default=None, metavar="DIR_OR_ZIP",
                   help="also measure, on these images, per stage the cosine similarity of the transformed model's "
                        "output to the plain model's output after the same block (and top-1 agreement when both classify)")
    p.add_argument("--eval-images", type=int, default=32, metavar="N", help="images used from --data (default 32)")
    p.add_argument("--plain", default=None, help="with --data: the plain checkpoint to compare with (default: MODEL)")
    add_old_names(p, {"--similarity": "--data", "--max-images": "--eval-images"})
    p.set_defaults(func="hpvit.cli.info:cmd_info")


def cmd_info(args) -> int:
    from ..analysis import format_table, stage_table

    model, plain = build_model(args.model, args.config, args.num_classes, args.format, args.spec)
    if plain is not None:
        print(plain.summary())
    else:
        model = saved_backbone(model, args.model, args.config)
    print(f"config: {model.config.name}  depths={model.layout.depths}  patch stride={model.stride}  head={model.head_type}")
    print(format_table(*stage_table(model, args.img_size)))
    print(model.reuse_report().summary())
    if getattr(args, "data", None):
        _print_similarity(model, plain, args)
    return 0


def _print_similarity(model, plain, args) -> None:
    """``hpvit info MODEL --data IMAGES``: distance of ``model`` to its plain source, stage by stage."""
    import torch

    from ..analysis import format_similarity, similarity_to_plain
    from ..data import build_transform
    from ..data.unlabeled import UnlabeledImages
    from ..engine.recipe import Recipe
    from ..models.build import from_plain

    if model.keep_prefix:
        raise ConfigError("--data (the similarity measurement) compares a hierarchical config with the plain model; pick e.g. --config paper-cls")
    if not args.eval_images or args.eval_images < 1:
        raise ConfigError(f"--eval-images must be >= 1, got {args.eval_images}")
    if args.plain:
        plain = args.plain
    elif plain is None:
        raise ConfigError(f"{args.model} is an hpvit file: name the plain checkpoint to compare it with, --plain PLAIN")
    steps = Steps(3, "info --data")
    try:
        steps.step(f"building the plain model from {plain if isinstance(plain, str) else args.model}")
        plain = from_plain(plain, "identity", format=args.format, spec_overrides=parse_key_values(args.spec, "--spec"))
        tf = build_transform(Recipe(img_size=args.img_size), False)
        ds = UnlabeledImages([args.data], tf, args.eval_images, 0)
        steps.step(f"decoding {len(ds)} image(s) from {args.data}")
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        steps.step(f"running both models on {len(ds)} image(s) at {args.img_size} px")
        result = similarity_to_plain(model, plain, images)
    finally:
        steps.close()
    print(f"\nsimilarity to the plain model on {len(ds)} image(s) from {args.data} at {args.img_size} px:")
    print(format_similarity(*result))
