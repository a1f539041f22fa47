"""``hpvit demo``, ``convert``, ``info`` and ``export``: the commands that read a checkpoint and write or
describe one model.

``info`` and ``demo --checkpoint`` take plain checkpoints and every file hpvit writes (classifier or
backbone, detector, segmenter): a saved file is described with its own stored config and the reuse
report recorded when it was converted. The arguments are built without importing torch; the commands'
own imports happen when one runs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import ConfigError
from .common import (Steps, add_common_model_args, add_model_arg, add_model_positional, add_old_names, add_overwrite_arg,
                     parse_key_values)


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="transform a ViT, print the reuse report and stage table, save a PNG of the pyramid "
                                    "and the plain vs transformed top-5 classes")
    add_model_arg(p, "plain ViT checkpoint or a file hpvit wrote (default: timm's pretrained DeiT-Tiny when it can "
                     "be downloaded, else a randomly initialised ViT-Tiny, said loudly)", required=False, old="--checkpoint")
    p.add_argument("--image", default=None, help="input image (default: a photo shipped with an installed package)")
    p.add_argument("--config", default="grid-cls", help="preset for a plain checkpoint (default grid-cls, which starts "
                                                         "at the plain model's function; paper-cls is the paper's)")
    p.add_argument("--img-size", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--offline", action="store_true", help="do not try to download the pretrained DeiT-Tiny")
    p.add_argument("--out", default="hpvit_demo.png", help="PNG to write (default hpvit_demo.png)")
    p.set_defaults(func="hpvit.cli.convert:cmd_demo")

    p = sub.add_parser("convert", help="convert a plain ViT checkpoint into an hpvit .safetensors file")
    add_model_positional(p, "checkpoint path, Hugging Face folder, or timm:<model name>")
    p.add_argument("-o", "--out", required=True, help="output .safetensors path")
    add_common_model_args(p)
    add_overwrite_arg(p)
    p.add_argument("--validate", action="store_true", help="check the identity config against the source's own library")
    p.add_argument("--reparameterize", action="store_true", help="merge avg-pool + conv pairs before saving")
    p.set_defaults(func="hpvit.cli.convert:cmd_convert")

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
    p.set_defaults(func="hpvit.cli.convert:cmd_info")

    p = sub.add_parser("export", help="write an ONNX file of a model: classifier logits or the 4-level pyramid")
    add_model_positional(p, "a file or run folder hpvit wrote (classifier, detector, segmenter, adapt) or a plain ViT "
                            "checkpoint (converted with --config)")
    p.add_argument("-o", "--out", required=True, help="output .onnx path")
    p.add_argument("--config", default=None, help="preset for a plain checkpoint (default paper-cls)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size for a plain checkpoint")
    p.add_argument("--pyramid", action="store_true",
                   help="export the backbone's pyramid (p1..p4, NCHW) instead of logits (always, for a detector or "
                        "segmenter: its backbone is what is exported)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic (default: fixed at 1)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input side the graph is exported for (default: the training size recorded in the file or run, "
                        "else 224)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    add_overwrite_arg(p)
    p.add_argument("--check", action="store_true", help="run the file with onnxruntime and print the max abs diff to PyTorch")
    p.set_defaults(func="hpvit.cli.convert:cmd_export")


def _size(path: str) -> str:
    p = Path(path)
    if p.is_file():
        return f" ({p.stat().st_size / 2**20:,.0f} MiB)"
    return ""


def _build(src: str, config: "str | None", num_classes: int | None = None, format: str | None = None,
           spec: list[str] | None = None, steps: "Steps | None" = None):
    """``(model, plain)`` from a plain checkpoint (``plain`` its :class:`PlainViT`), or ``(model, None)`` from a
    file hpvit wrote (whose stored config wins; see :func:`_saved_backbone`). ``config`` may name any preset,
    the plain dense baselines (``plain-det``, ``plain-seg``) included."""
    from ..checkpoints import load_plain
    from ..checkpoints.native import is_hpvit_model_file
    from ..export import load
    from ..models.build import from_plain

    if is_hpvit_model_file(src):
        return load(src), None
    config = config or "paper-cls"
    if steps:
        steps.step(f"reading {src}{_size(src)}")
    plain = load_plain(src, format=format, **parse_key_values(spec, "--spec"))
    if steps:
        steps.step(f"mapping its weights onto {config}")
    return from_plain(plain, config=config, num_classes=num_classes), plain


def _saved_backbone(model, src: str, config: "str | None"):
    """The HierarchicalViT inside a loaded hpvit file, after printing what the file holds."""
    from ..models.build import stored_config_conflict

    meta = getattr(model, "hpvit_meta", None)
    vit = model.body.vit if meta is not None else model
    if meta is not None:
        what = {"det": "Mask R-CNN detector", "seg": "UperNet segmenter"}.get(meta.get("task"), meta.get("task"))
        print(f"{src}: hpvit {what} ({meta.get('num_classes')} classes), backbone {meta.get('config_name')} "
              f"({meta.get('backbone')}), trained at {meta.get('img_size') or meta.get('crop')} px")
    else:
        print(f"{src}: hpvit model file, config {vit.config.name}, {vit.num_classes} classes")
    conflict = stored_config_conflict(src, config, vit.config.name)
    if conflict:
        print(f"note: --config {config} ignored: {conflict}")
    return vit


def cmd_info(args) -> int:
    from ..analysis import format_table, stage_table

    model, plain = _build(args.model, args.config, args.num_classes, args.format, args.spec)
    if plain is not None:
        print(plain.summary())
    else:
        model = _saved_backbone(model, args.model, args.config)
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


def _warn_non_finite(state_dict: dict, src: str) -> list[str]:
    """Print a warning naming the tensors of ``src`` that hold NaN or inf values; returns their names."""
    import torch

    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        print(f"hpvit: warning: {len(bad)} tensor(s) of {src} hold NaN or inf values, e.g. {bad[:3]}; the converted "
              "model will output NaN. The source checkpoint is damaged (or diverged in training): use another copy",
              file=sys.stderr)
    return bad


def cmd_convert(args) -> int:

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"output {out} must end in .safetensors (hpvit writes safetensors + JSON metadata)")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; refusing to overwrite it (add --overwrite to replace it)")
    src_path = Path(args.model)
    before = src_path.stat().st_mtime_ns if src_path.is_file() else None
    steps = Steps(4 if args.validate else 3, "convert")
    try:
        model, plain = _build(args.model, args.config, args.num_classes, args.format, args.spec, steps)
        if plain is None:
            raise ConfigError(f"{args.model} is already an hpvit file; nothing to convert")
        return _finish_convert(args, out, model, plain, steps, src_path, before)
    finally:
        steps.close()


def _finish_convert(args, out: Path, model, plain, steps: Steps, src_path: Path, before: "int | None") -> int:
    """Report, optionally validate, and write the converted ``model`` (the rest of ``hpvit convert``)."""
    from ..export import save
    from ..verify import validate_identity

    print(plain.summary())  # names the detected format once
    _warn_non_finite(plain.state_dict, args.model)
    print(model.reuse_report().summary())
    if args.validate:
        steps.step("validating the identity config against the source's own library")
        res = validate_identity(args.model, plain=plain)
        print(f"validate: identity config vs {res['library']}: max |diff| {res['max_abs_diff']:.3g}, "
              f"max rel diff {res['max_rel_diff']:.3g} -> {'OK' if res['ok'] else 'MISMATCH'}")
        if not res["ok"]:
            print("hpvit: error: validation failed; nothing was written", file=sys.stderr)
            return 1
    if args.reparameterize:
        model.reparameterize()
    steps.step(f"writing {out}")
    save(model, out, force=args.overwrite)
    if before is not None:
        assert src_path.stat().st_mtime_ns == before
    print(f"wrote {out} (config {model.config.name}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)")
    return 0


# ---------------------------------------------------------------------------------------------- demo
def synthetic_scene(size: int = 224):
    """A deterministic street-like test image (PIL), so the demo needs no files."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    for y in range(size):  # sky gradient
        t = y / size
        d.line([(0, y), (size, y)], fill=(int(90 + 100 * t), int(150 + 60 * t), 235))
    s = size / 224
    d.rectangle([0, int(150 * s), size, size], fill=(70, 70, 75))  # road
    d.polygon([(0, int(150 * s)), (size, int(150 * s)), (size, int(165 * s)), (0, int(165 * s))], fill=(160, 160, 150))
    d.rectangle([int(20 * s), int(60 * s), int(100 * s), int(150 * s)], fill=(170, 60, 50))  # house
    d.polygon([(int(15 * s), int(60 * s)), (int(60 * s), int(25 * s)), (int(105 * s), int(60 * s))], fill=(90, 40, 30))
    for i in range(3):
        for j in range(2):
            x0, y0 = int((30 + 25 * i) * s), int((75 + 35 * j) * s)
            d.rectangle([x0, y0, x0 + int(12 * s), y0 + int(18 * s)], fill=(240, 230, 140))
    d.ellipse([int(160 * s), int(20 * s), int(200 * s), int(60 * s)], fill=(255, 220, 60))  # sun
    d.rectangle([int(130 * s), int(80 * s), int(140 * s), int(150 * s)], fill=(90, 60, 30))  # tree
    d.ellipse([int(110 * s), int(45 * s), int(160 * s), int(100 * s)], fill=(40, 130, 50))
    d.rounded_rectangle([int(120 * s), int(170 * s), int(200 * s), int(200 * s)], radius=int(6 * s), fill=(30, 80, 200))  # car
    for cx in (135, 185):
        d.ellipse([int((cx - 8) * s), int(192 * s), int((cx + 8) * s), int(208 * s)], fill=(20, 20, 20))
    return img


def _pca_rgb(fmap):
    """(D, H, W) -> (H, W, 3) in [0, 1]: the first three principal components of the channels."""
    import torch

    d, h, w = fmap.shape
    x = fmap.reshape(d, -1).T.float()
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    y = x @ v[:3].T
    lo, hi = y.quantile(0.01, dim=0), y.quantile(0.99, dim=0)
    y = ((y - lo) / (hi - lo + 1e-6)).clamp(0, 1)
    return y.reshape(h, w, 3).numpy()


DEMO_HUB_MODEL = "deit_tiny_patch16_224.fb_in1k"  # timm's pretrained DeiT-Tiny (5.7M parameters, ImageNet-1k)
DEMO_PHOTO = "grace_hopper.jpg"  # a public-domain photo shipped with matplotlib (a dependency): mpl-data/sample_data


def demo_photo() -> "str | None":
    """The path of the real photo the demo uses by default, or None when this matplotlib does not ship it."""
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / DEMO_PHOTO
    except Exception:  # noqa: BLE001 - an unusual matplotlib install: the demo falls back to its drawn scene
        return None
    return str(p) if p.is_file() else None


def _banner(lines: "list[str]") -> None:
    bar = "!" * 78
    print("\n".join([bar] + [f"!! {ln}" for ln in lines] + [bar]))


def _demo_plain(args):
    """``(PlainViT, pretrained)`` for the demo: ``--model``, else timm's pretrained DeiT-Tiny from the hub,
    else (offline, or ``--offline``) a randomly initialised ViT-Tiny, said loudly."""
    import timm
    import torch

    from ..checkpoints import load_plain
    from ..errors import CheckpointError, OfflineError

    if args.model:
        return load_plain(args.model), True
    why = "--offline given"
    if not args.offline:
        try:
            plain = load_plain(f"timm:{DEMO_HUB_MODEL}")
            plain.source = f"timm's pretrained DeiT-Tiny ({DEMO_HUB_MODEL}, from the Hugging Face Hub)"
            return plain, True
        except (OfflineError, CheckpointError) as e:
            why = f"the pretrained DeiT-Tiny could not be had: {str(e).split('. ')[0]}"
    _banner([f"NO PRETRAINED WEIGHTS ({why}):",
             "using a RANDOMLY INITIALISED ViT-Tiny/16 (timm architecture).",
             "Its features and classes are meaningless; this only shows the transform working end to end.",
             "For real features: hpvit demo --model path/to/plain_vit.pth (or run it online)"])
    torch.manual_seed(0)
    plain = load_plain(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict())
    plain.source = "random ViT-Tiny/16 (no pretrained weights)"
    return plain, False


def _demo_input(args, size: int):
    """``(PIL image size x size, name)``: ``--image``, else the photo shipped with matplotlib (shorter side
    resized to size * 256 / 224, centre crop), else the drawn scene."""
    from PIL import Image

    from ..data.images import decode_image  # the guarded decoder: a bomb or a non-image is a clear error

    path = args.image or demo_photo()
    if path is None:
        print("note: no photo found in matplotlib's sample data; using a drawn scene (pass --image PHOTO)")
        return synthetic_scene(size), "built-in drawn scene"
    img = decode_image(path)
    short = round(size * 256 / 224)
    w, h = img.size
    img = img.resize((max(short, round(w * short / h)), max(short, round(h * short / w))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    name = path if args.image else f"{DEMO_PHOTO} (a photo shipped with matplotlib)"
    return img.crop((left, top, left + size, top + size)), name


def demo_tensor(img):
    """``(H, W, 3) array in [0, 1], (1, 3, H, W) ImageNet-normalised tensor)`` of a PIL image."""
    import numpy as np
    import torch

    arr = np.asarray(img, dtype=np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return arr, torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1)).float().unsqueeze(0)


def class_names(n: int) -> "list[str]":
    """ImageNet-1k class names (timm's) for a 1000-class head, else ``class i``."""
    if n == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i).split(",")[0] for i in range(n)]
        except Exception:  # noqa: BLE001 - an older timm without the class list: indices still tell the classes apart
            pass
    return [f"class {i}" for i in range(n)]


def top5(logits, names: "list[str]") -> "list[tuple[str, float]]":
    p = logits.softmax(-1)[0]
    v, i = p.topk(min(5, p.numel()))
    return [(names[k], float(x)) for k, x in zip(i.tolist(), v.tolist())]


def cmd_demo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from ..analysis import format_table, stage_table
    from ..checkpoints.native import is_hpvit_model_file
    from ..export import load
    from ..models.build import from_plain
    from ..utils import atomic_write

    t0 = time.time()
    plain, pretrained = None, True
    if args.model and is_hpvit_model_file(args.model):
        model = _saved_backbone(load(args.model), args.model, None).eval()
        source = model.reuse_report().source
    else:
        plain, pretrained = _demo_plain(args)
        model = from_plain(plain, config=args.config).eval()
        source = plain.source
        print(plain.summary())
    if model.keep_prefix or len(model.feature_info) != 4:
        where = f"{args.model} holds a {model.config.name} model" if plain is None else f"--config {args.config}"
        raise ConfigError(f"the demo shows a 4-level feature pyramid, but {where}; use a hierarchical config "
                          "(grid-cls, paper-cls, grid-det, paper-seg...) or a file converted with one")
    print()
    print(model.reuse_report().summary())
    print()
    print(format_table(*stage_table(model, args.img_size)))

    size = args.img_size
    img, img_name = _demo_input(args, size)
    arr, x = demo_tensor(img)
    ranked = []  # (title, top-5)
    with torch.no_grad():
        maps = model.forward_pyramid(x)
        if model.num_classes > 0:
            names = class_names(model.num_classes)
            if plain is not None and plain.spec.num_classes == model.num_classes:
                ranked.append(("plain ViT (identity config: the source exactly)",
                               top5(from_plain(plain, "identity").eval()(x), names)))
            ranked.append((f"transformed ({model.config.name}, before any fine-tuning)", top5(model(x), names)))
    for title, rows in ranked:
        print(f"\ntop-5 classes, {title}:")
        for name, pr in rows:
            print(f"  {pr * 100:5.1f}%  {name}")

    fig = plt.figure(figsize=(17, 6.6 if ranked else 3.8))
    grid = fig.add_gridspec(2 if ranked else 1, 5, height_ratios=(1, 0.8) if ranked else None)
    axes = [fig.add_subplot(grid[0, i]) for i in range(5)]
    axes[0].imshow(arr)
    axes[0].set_title(f"input {size}x{size}")
    for ax, fm, st in zip(axes[1:], maps, model.strides):
        ax.imshow(_pca_rgb(fm[0]), interpolation="nearest")
        ax.set_title(f"1/{st}: {fm.shape[-2]}x{fm.shape[-1]}x{fm.shape[1]}")
    for ax in axes:
        ax.axis("off")
    spans = [slice(0, 2), slice(3, 5)] if len(ranked) == 2 else [slice(1, 4)]
    top = max((r[1] for _, rows in ranked for r in rows), default=0.01) * 100
    for (title, rows), span in zip(ranked, spans):  # one probability scale for both, so they compare honestly
        ax = fig.add_subplot(grid[1, span])
        labels, probs = [r[0] for r in rows][::-1], [r[1] * 100 for r in rows][::-1]
        ax.barh(range(len(rows)), probs, color="tab:blue" if title.startswith("plain") else "tab:orange")
        ax.set_yticks(range(len(rows)), labels, fontsize=9)
        for i, v in enumerate(probs):
            ax.text(v, i, f" {v:.1f}%" if v >= 1 else f" {v:.2f}%", va="center", fontsize=8)
        ax.set_xlim(0, min(100.0, top * 1.3))
        ax.set_title(f"top-5, {title}", fontsize=10)
        note = ""
        if not title.startswith("plain"):
            kept = len({r[0] for r in rows} & {r[0] for r in ranked[0][1]}) if len(ranked) == 2 else 0
            same = len(ranked) == 2 and ranked[0][1][0][0] == rows[0][0]
            note = (" (the plain model's top class: the transform kept the function)" if same else
                    f" ({kept} of the plain top-5 kept; fine-tune with train cls before trusting it)" if kept >= 3 else
                    " (fine-tune with train cls, or align with adapt, before trusting it)")
        ax.set_xlabel("probability (%)" + note)
    what = "" if pretrained else " — RANDOM WEIGHTS: features and classes are meaningless"
    fig.suptitle(f"hpvit {model.config.name} from {source}{what}\nfeature maps: first 3 principal components; "
                 f"input: {img_name}", fontsize=10, color="black" if pretrained else "darkred")
    fig.tight_layout(rect=(0, 0, 1, 0.94 if ranked else 0.88))  # room for the suptitle above the panel titles
    out = Path(args.out)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), force=True)
    finally:
        plt.close(fig)
    print()
    print(f"input: {img_name}; pyramid: " + ", ".join(f"1/{st} {tuple(m.shape)}" for st, m in zip(model.strides, maps)))
    print(f"wrote {out} in {time.time() - t0:.1f}s")
    return 0


def _export_source(args):
    """``(HierarchicalViT, pyramid, img_size, why)`` for ``hpvit export``: from any file or run folder hpvit wrote
    (a detector or segmenter gives its backbone's pyramid) or a plain checkpoint, at the size the model was
    trained at unless ``--img-size`` says otherwise."""
    import json

    from ..checkpoints.native import is_hpvit_model_file, model_file
    from ..errors import OutputError
    from ..export import load
    from ..models.build import from_plain

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise OutputError(f"{out} exists; refusing to overwrite it (add --overwrite to replace it, or choose another path)")
    pyramid, size, why = args.pyramid, None, "no training size recorded"
    if is_hpvit_model_file(args.model):
        f = Path(model_file(args.model))
        model = load(f)
        meta = getattr(model, "hpvit_meta", None)
        if meta is not None:  # a detector / segmenter: its heads (torchvision's Mask R-CNN, UperNet) stay in PyTorch
            vit = model.body.vit
            what = {"det": "Mask R-CNN detector", "seg": "UperNet segmenter"}.get(meta.get("task"), meta.get("task"))
            if vit.keep_prefix or len(vit.feature_info) < 2:
                raise ConfigError(f"{args.model} is a {what} on the plain {meta.get('config_name')} backbone, whose "
                                  "single-scale ViT has no hierarchical pyramid to export (its simple feature pyramid "
                                  "lives in the detection/segmentation wrapper, which is not exported); export works "
                                  "for transformed backbones (paper-det, paper-seg)")
            if not pyramid:
                print(f"note: {args.model} is a {what}: exporting its backbone's {len(vit.feature_info)}-level pyramid "
                      "(the task head is not exported; run it in PyTorch with hpvit.load)")
            model, pyramid = vit, True
            size, why = meta.get("img_size") or meta.get("crop"), "its training size"
        pre = f.parent / "model.json"  # classifier / adapt runs: the preprocessing record next to the model
        if size is None and pre.is_file():
            try:
                size, why = json.loads(pre.read_text()).get("img_size"), f"its training size ({pre.name})"
            except (OSError, json.JSONDecodeError):
                size = None
    else:
        model = from_plain(args.model, config=args.config or "paper-cls", num_classes=args.num_classes)
    if args.img_size:
        size, why = args.img_size, "--img-size"
    elif not size:
        size = 224
    return model, pyramid, int(size), why


def cmd_export(args) -> int:
    """``hpvit export MODEL -o OUT.onnx [--pyramid] [--dynamic-batch] [--img-size N] [--check]``."""
    import torch

    from ..export import compare_onnx, export_onnx, output_names

    model, pyramid, size, why = _export_source(args)
    path = export_onnx(model, args.out, img_size=size, pyramid=pyramid, dynamic_batch=args.dynamic_batch,
                       opset=args.opset, force=args.overwrite)
    outs = output_names(model, pyramid)
    batch = "B" if args.dynamic_batch else "1"
    print(f"wrote {path}: input images ({batch}, {model.spec.in_chans}, {size}, {size}) float32 at {size} px ({why}) -> "
          f"{', '.join(outs)}; " + ("batch dimension dynamic" if args.dynamic_batch else
                                     "batch fixed at 1 (add --dynamic-batch for any batch)")
          + "; height and width are fixed")
    if args.check:
        x = torch.randn(2 if args.dynamic_batch else 1, model.spec.in_chans, size, size)
        diff = compare_onnx(model, path, x, pyramid)
        print(f"onnxruntime vs PyTorch: max abs diff {diff:.2e}")
    return 0
