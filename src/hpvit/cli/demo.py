"""``hpvit demo``: transform a ViT, print the reuse report and stage table, and save a PNG of the pyramid and
the plain vs transformed top-5 classes on a photo.

``--model`` takes plain checkpoints and every file hpvit writes (a saved file is shown with its own stored
config). The arguments are built without importing torch; the command's own imports happen when it runs."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConfigError
from .common import add_model_arg, add_overwrite_arg, check_output, config_help
from .source import saved_backbone


DEMO_CONFIG = "grid-cls"  # keeps 4 of the plain top-5 on the demo photo before any training (docs/demo.png)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="transform a ViT, print the reuse report and stage table, save a PNG of the pyramid "
                                    "and the plain vs transformed top-5 classes")
    add_model_arg(p, "plain ViT checkpoint or a file hpvit wrote (default: timm's pretrained DeiT-Tiny when it can "
                     "be downloaded, else a randomly initialised ViT-Tiny, said loudly)", required=False, old="--checkpoint")
    p.add_argument("--image", default=None, help="input image (default: a photo shipped with an installed package)")
    p.add_argument("--config", default=DEMO_CONFIG, help=config_help("cls", DEMO_CONFIG, "for a plain checkpoint"))
    p.add_argument("--img-size", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--offline", action="store_true", help="do not try to download the pretrained DeiT-Tiny")
    p.add_argument("-o", "--out", default="hpvit_demo.png", help="PNG to write (default hpvit_demo.png)")
    add_overwrite_arg(p)
    p.set_defaults(func="hpvit.cli.demo:cmd_demo")


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
    out = check_output(args.out, overwrite=args.overwrite, suffix=".png", why="the demo writes a PNG picture",
                       sources=[(args.image, "the input image (--image)"), (args.model, "the model (--model)"),
                                (demo_photo(), "the photo the demo reads")])
    plain, pretrained = None, True
    if args.model and is_hpvit_model_file(args.model):
        model = saved_backbone(load(args.model), args.model, None).eval()
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
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), force=args.overwrite)
    finally:
        plt.close(fig)
    print()
    print(f"input: {img_name}; pyramid: " + ", ".join(f"1/{st} {tuple(m.shape)}" for st, m in zip(model.strides, maps)))
    print(f"wrote {out} in {time.time() - t0:.1f}s")
    return 0


