"""Configuration dataclasses and the named presets.

A :class:`HPViTConfig` describes how a plain ViT is transformed; it says nothing about the plain ViT
itself (width, depth, heads...), which comes from the checkpoint (:class:`hpvit.checkpoints.PlainSpec`).
The same config therefore applies to ViT-Tiny and ViT-Huge alike; depth-dependent choices (the stage
split, the detection layout) are resolved by :meth:`HPViTConfig.resolve` once the depth is known.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .dictio import DictIO, field_type_problems, name_or_json

POOL_KINDS = ("avgconv", "avg", "conv", "max", "gap", "subconv", "sub", "subavg", "subgconv")
ATTENTION_KINDS = ("window", "phase")
POS_SAMPLINGS = ("interpolate", "phase")
PREFIX_MERGES = ("keep", "mean")
POOL_PADDINGS = ("zeros", "replicate")
CLASS_TOKEN_MODES = ("drop", "join", "auto")
HEAD_KINDS = ("avg", "token", "auto", "none")


SPLITS = ("paper", "fast", "lite")


def efficiency_depth_split(depth: int, split: str) -> tuple[int, ...]:
    """Stage depths of the efficiency presets (4 stages; every block reused, all 4 levels kept).

    The cost of a block grows with its stage's token count (1/4: 16x, 1/8: 4x, 1/32: 1/4 of a 1/16
    block), so these move blocks out of the high-resolution stages:

    * ``fast``: ``(1, 1, depth - 4, 2)`` -- one window block at 1/4 and at 1/8 (12 -> 1-1-8-2).
    * ``lite``: ``(0, 0, depth - 2, 2)`` -- the 1/4 level is the stride-4 patch embedding and the 1/8
      level its pooled map; the transformer starts at 1/16 (12 -> 0-0-10-2). Costs about a plain ViT.

    See docs/performance.md for the measurements behind them.
    """
    if split == "fast":
        if depth < 5:
            raise ConfigError(f"the 'fast' split needs at least 5 blocks, the plain ViT has {depth}")
        return (1, 1, depth - 4, 2)
    if split == "lite":
        if depth < 3:
            raise ConfigError(f"the 'lite' split needs at least 3 blocks, the plain ViT has {depth}")
        return (0, 0, depth - 2, 2)
    raise ConfigError(f"unknown depth_split {split!r}; choose from {SPLITS}")


def default_depth_split(depth: int, num_stages: int = 4) -> tuple[int, ...]:
    """Blocks per stage for a ``depth``-block plain ViT split into ``num_stages`` stages.

    12 -> 2-2-6-2 (the paper), 24 -> 2-2-18-2 and 32 -> 2-2-26-2 (Swin-style: the expensive 1/4 and
    1/8 stages keep two blocks, the 1/16 stage takes the rest). Depths below 7 give one block to each
    early stage. See docs/design.md.
    """
    if num_stages == 1:
        return (depth,)
    if num_stages != 4:
        raise ConfigError(f"automatic depth split supports 1 or 4 stages, got {num_stages}; give `depths` explicitly")
    if depth < 4:
        raise ConfigError(
            f"a {depth}-block ViT cannot be split into 4 stages (needs at least 4 blocks); "
            "use config='identity' or give `depths` with fewer stages"
        )
    if depth >= 7:
        return (2, 2, depth - 6, 2)
    return (1, 1, depth - 3, 1)


@dataclass
class HPViTConfig(DictIO):
    """How to transform a plain ViT into a hierarchical one.

    Attributes:
        name: preset name (informational).
        patch_stride: stride of the patch embedding in pixels; the pre-trained kernel (e.g. 16x16) is
            kept. ``None`` means stride = kernel (the plain ViT).
        patch_padding: padding of the patch embedding; ``None`` = (kernel - stride) // 2, which gives
            exactly H/stride for H divisible by the stride (16x16 kernel, stride 4 -> padding 6).
        depths: blocks per stage; ``None`` = :func:`default_depth_split` (2-2-6-2 for 12 blocks).
        num_stages: used with ``depths=None``.
        depth_split: rule for ``depths=None``: ``paper`` (:func:`default_depth_split`, 2-2-6-2) or an
            efficiency split, ``fast`` / ``lite`` (:func:`efficiency_depth_split`; 4 stages only).
        window_sizes: window size per stage (``None`` = global attention).
        global_blocks: optional 0-based block indices forced to global attention (every other block
            uses its stage's window). ``"det"`` = the paper's detection layout: the plain baseline has
            four evenly spaced global blocks; the first becomes windowed, the last three stay global.
            ``"baseline"`` = those four (the plain ViTDet baseline, ``plain-det``).
        rel_pos: zero-initialised relative position bias in window attention.
        pools: pooling layer between consecutive stages (len = stages - 1): ``avgconv`` (3x3/2 average
            pool + parallel 3x3/2 conv initialised to zero), ``avg``, ``conv``, ``max`` (2x2/2) or ``gap``
            (global average pooling: the next stage runs on a single token; the paper's literal reading
            of "the last pooling layer is modified to a simple global average pooling").
            ``subconv`` (phase-aligned: the stride-2 subsample ``x[::2, ::2]``, i.e. the centre tap of a 3x3/2
            window, + the parallel zero-initialised 3x3/2 conv; merged exactly into one conv by
            ``reparameterize()``) or ``sub`` (the subsample alone). A subsample keeps whole phases (see
            ``attention``), so a ``grid-*`` model starts at the plain model's function. Mixing across phases
            that is exact at initialisation (issue 27; the ``grid-*`` defaults stay ``sub`` until the study
            decides): ``subavg`` = ``sub + g * (avg - sub)`` with a zero-initialised per-channel gate ``g``,
            ``subgconv`` = ``sub + g * conv3x3/2`` (the conv starting at the ``avg - sub`` kernel, ``pool_conv``
            applies); both merge exactly into one conv with ``reparameterize()``.
        pool_conv: ``depthwise`` or ``full`` parallel conv of ``avgconv``/``subconv``/``conv``.
        pool_padding: border handling of the 3x3/2 pools: ``zeros`` (zero padding counted in the average,
            which shrinks the top row and left column) or ``replicate`` (edge tokens repeated, so a
            constant map stays constant); both re-parameterize exactly.
        class_token: ``drop`` (hierarchical stages carry no prefix tokens) or ``join``: the pre-trained
            class (and register) tokens, with their own position embedding, join the sequence at the
            first global-attention block and pass through later pooling layers unchanged; every block
            after the join must be global. Needs a source with a class token. ``auto``: ``join`` when
            the source has a class token and the layout allows it (no windowed block after the first
            global one), else ``drop``.
        attention: ``window`` (the paper: windowed stages attend inside local ``ws x ws`` windows) or
            ``phase``: in every stage whose stride is below the patch size, a block attends among the tokens
            of one *phase* (positions equal modulo ``r = patch / stage stride``: 4 at 1/4, 2 at 1/8 for a
            16-px patch), and each phase is the plain token grid of a shifted image. Inside a phase grid the
            stage keeps its own layout: ``window_sizes`` / ``global_blocks`` apply to the phase grid (``None``
            = global among the phase's tokens). Needs a patch size that is the stride times a power of two.
        pos_embed_sampling: ``interpolate`` (bicubic resampling of the source grid to the token map) or
            ``phase``: the source grid (resampled to the phase grid's size, which is the source grid itself
            at the source resolution) is repeated ``r x r`` times, so every phase carries exactly the
            position embedding the plain model gives its tokens.
        prefix_merge: with ``attention='phase'`` the joined class token has one copy per phase group; at a
            pooling layer the copies of the merging phases become one: ``keep`` (the surviving phase's copy,
            the one the subsample keeps, so the plain model's chain of class tokens is preserved) or
            ``mean`` (their average).
        sub_phase: which phase of the finest stage the subsample pools (``sub``/``subconv``) keep, 0 .. r-1
            per side (``r = patch / stride``): pool ``k`` takes tap ``1 + bit k of sub_phase`` of its 3x3/2
            window (the centre, or the one after it). With a 16-px kernel at stride 4 and padding 6, phase
            ``p`` is the plain grid of the image shifted by ``6 - 4p`` pixels: 0 -> 6 px right/down (zeros
            enter at the top-left and the last 6 px are never seen by the surviving chain), 1 -> 2 px,
            2 -> -2 px, 3 -> -6 px.
        head: ``avg`` (global average pooling), ``token`` (class token), ``auto`` (as the source
            model: token if it has a class token and no fc_norm) or ``none``.
        keep_prefix_tokens: keep class/register tokens in the sequence (only for all-global layouts).
        img_size: the default input resolution (training crop; the position embedding stays at the source
            grid and is interpolated to each input's grid at run time).
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        reparameterized: the avg+conv pools are already merged (set by ``reparameterize()``).
        act: override of the MLP activation (``gelu``, ``quick_gelu``); ``None`` = the source's.
        fused_attn: use ``scaled_dot_product_attention``.
    """

    name: str = "custom"
    patch_stride: int | None = 4
    patch_padding: int | None = None
    depths: tuple[int, ...] | None = None
    num_stages: int = 4
    depth_split: str = "paper"
    window_sizes: tuple[int | None, ...] = (7, 7, None, None)
    global_blocks: tuple[int, ...] | str | None = None
    rel_pos: bool = True
    pools: tuple[str, ...] = ("avgconv", "avgconv", "avgconv")
    pool_conv: str = "depthwise"
    pool_padding: str = "zeros"
    class_token: str = "drop"
    attention: str = "window"
    pos_embed_sampling: str = "interpolate"
    prefix_merge: str = "keep"
    sub_phase: int = 0
    head: str = "avg"
    keep_prefix_tokens: bool = False
    img_size: int | tuple[int, int] = 224
    drop_path_rate: float = 0.0
    reparameterized: bool = False
    act: str | None = None
    fused_attn: bool = True

    def _check(self, where: str = "") -> None:
        """Field types and ranges of a config read from JSON or changed with ``replace`` (``"rel_pos": "no"``
        would otherwise count as on, ``"drop_path_rate": "0.1"`` fail deep in the model build)."""
        pre = f"{where}: " if where else ""
        wrong = field_type_problems(self)
        if wrong:
            raise ConfigError(f"{pre}wrong value type for " + "; ".join(wrong) + " (JSON true/false for flags, numbers "
                              "without quotes, null for none)")
        for k in ("patch_stride", "patch_padding"):
            v, low = getattr(self, k), 1 if k == "patch_stride" else 0
            if v is not None and v < low:
                raise ConfigError(f"{pre}{k} must be an integer >= {low} or null (null: "
                                  + ("stride = the patch size, the plain ViT" if low else "(kernel - stride) // 2")
                                  + f"), got {v}")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"{pre}drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.num_stages < 1:
            raise ConfigError(f"{pre}num_stages must be >= 1, got {self.num_stages}")
        sizes = self.img_size if isinstance(self.img_size, tuple) else (self.img_size,)
        if any(v < 1 for v in sizes):
            raise ConfigError(f"{pre}img_size must be positive, got {self.img_size}")

    # ------------------------------------------------------------------ resolution
    def resolve(self, depth: int) -> "ResolvedLayout":
        """Per-block layout for a ``depth``-block plain ViT; raises ConfigError on inconsistencies."""
        if self.depth_split not in SPLITS:
            raise ConfigError(f"unknown depth_split {self.depth_split!r}; choose from {SPLITS}")
        if self.depths is not None:
            depths = tuple(self.depths)
        elif self.depth_split == "paper":
            depths = default_depth_split(depth, self.num_stages)
        else:
            if self.num_stages != 4:
                raise ConfigError(f"depth_split={self.depth_split!r} needs 4 stages, got num_stages={self.num_stages}")
            depths = efficiency_depth_split(depth, self.depth_split)
        if any(not isinstance(d, int) or d < 0 for d in depths) or not any(depths):
            raise ConfigError(
                f"stage depths must be non-negative ints with at least one block in total, got depths={depths} "
                "(a 0-block stage is allowed: its pyramid level is the output of the pooling layer into it)"
            )
        if sum(depths) != depth:
            raise ConfigError(
                f"depths={depths} sum to {sum(depths)} blocks but the plain ViT has {depth}; every pre-trained "
                f"block is reused, so the stage depths must add up to {depth}"
            )
        n = len(depths)
        if len(self.window_sizes) != n:
            raise ConfigError(f"window_sizes has {len(self.window_sizes)} entries for {n} stages: give one per stage")
        if len(self.pools) != n - 1:
            raise ConfigError(f"pools has {len(self.pools)} entries for {n} stages: give one per stage transition ({n - 1})")
        for p in self.pools:
            if p not in POOL_KINDS:
                raise ConfigError(f"unknown pool kind {p!r}; choose from {POOL_KINDS}")
        if self.pool_padding not in POOL_PADDINGS:
            raise ConfigError(f"pool_padding must be one of {POOL_PADDINGS}, got {self.pool_padding!r}")
        if self.class_token not in CLASS_TOKEN_MODES:
            raise ConfigError(f"class_token must be one of {CLASS_TOKEN_MODES}, got {self.class_token!r}")
        if "gap" in self.pools[:-1]:
            raise ConfigError("pool kind 'gap' (global average pooling) can only be the last pooling layer")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.pos_embed_sampling not in POS_SAMPLINGS:
            raise ConfigError(f"pos_embed_sampling must be one of {POS_SAMPLINGS}, got {self.pos_embed_sampling!r}")
        if self.prefix_merge not in PREFIX_MERGES:
            raise ConfigError(f"prefix_merge must be one of {PREFIX_MERGES}, got {self.prefix_merge!r}")
        if not isinstance(self.sub_phase, int) or self.sub_phase < 0:
            raise ConfigError(f"sub_phase must be a non-negative int (a phase index), got {self.sub_phase!r}")
        if self.pool_conv not in ("depthwise", "full"):
            raise ConfigError(f"pool_conv must be 'depthwise' or 'full', got {self.pool_conv!r}")
        if self.head not in HEAD_KINDS:
            raise ConfigError(f"unknown head {self.head!r}; choose from {HEAD_KINDS}")
        for w in self.window_sizes:
            if w is not None and (not isinstance(w, int) or w < 1):
                raise ConfigError(f"window sizes must be positive ints or None, got {w!r}")
        stage_of = [s for s, d in enumerate(depths) for _ in range(d)]
        windows: list[int | None] = [self.window_sizes[s] for s in stage_of]
        gb = self.global_blocks
        if gb == "det":
            gb = detection_global_blocks(depth)
        elif gb == "baseline":
            gb = baseline_global_blocks(depth)
        if isinstance(gb, str):
            raise ConfigError(f"global_blocks must be a tuple of block indices, 'det' or 'baseline', got {gb!r}")
        if gb is not None:
            gb = tuple(int(i) for i in gb)
            bad = [i for i in gb if not 0 <= i < depth]
            if bad:
                raise ConfigError(f"global_blocks {bad} out of range for a {depth}-block ViT (0-based indices)")
            for i in range(depth):
                if i in gb:
                    windows[i] = None
                elif windows[i] is None:
                    raise ConfigError(
                        f"block {i} is not in global_blocks but its stage {stage_of[i]} has no window size; "
                        "give every stage a window size when using global_blocks"
                    )
        if self.keep_prefix_tokens and (n > 1 or any(w is not None for w in windows)):
            raise ConfigError("keep_prefix_tokens needs a single-stage, all-global layout (like the 'identity' preset)")
        if self.class_token == "join":
            if self.keep_prefix_tokens:
                raise ConfigError("class_token='join' is for hierarchical configs; keep_prefix_tokens already keeps it")
            glob = [i for i, w in enumerate(windows) if w is None]
            if not glob:
                raise ConfigError("class_token='join' needs a global-attention block to join at; this layout has none")
            late = [i for i in range(glob[0], depth) if windows[i] is not None]
            if late:
                raise ConfigError(
                    f"class_token='join' joins at the first global block ({glob[0]}) but blocks {late} after it are "
                    "windowed, and a class token cannot take part in window attention; use class_token='drop'"
                )
        stage_ends = tuple(sum(depths[: s + 1]) - 1 for s in range(n))
        glob = [i for i, w in enumerate(windows) if w is None]
        joinable = bool(glob) and all(w is None for w in windows[glob[0]:]) and not self.keep_prefix_tokens
        return ResolvedLayout(depths=depths, windows=tuple(windows), stage_of=tuple(stage_of), stage_ends=stage_ends,
                              joinable=joinable)


def phase_dilations(patch: int, stride: int, num_stages: int) -> tuple[int, ...]:
    """Dilation of phase attention per stage: ``r_s = patch / (stride * 2**s)`` while above 1, then 1.

    With a ``patch``-pixel kernel at stride ``stride`` the tokens whose positions are equal modulo
    ``r_0 = patch / stride`` form the plain model's token grid of a shifted image (a *phase*); each 2x
    pooling halves the dilation. The phases tile the map only when ``r_0`` is a power of two; otherwise
    a ConfigError names the strides that work.
    """
    if patch % stride:
        ok = [s for s in range(1, patch + 1) if patch % s == 0 and (patch // s) & (patch // s - 1) == 0]
        raise ConfigError(
            f"attention='phase' needs the patch stride to divide the patch size: stride {stride} does not divide "
            f"the {patch}-px patch; use patch_stride in {ok}, or attention='window'"
        )
    r = patch // stride
    if r & (r - 1):
        ok = [s for s in range(1, patch + 1) if patch % s == 0 and (patch // s) & (patch // s - 1) == 0]
        raise ConfigError(
            f"attention='phase' with a {patch}-px patch at stride {stride} gives {r} phases per side, which 2x "
            f"pooling cannot halve down to 1 (the phases would not tile the next map); use patch_stride in {ok}, "
            "or attention='window'"
        )
    return tuple(max(1, r >> s) for s in range(num_stages))


@dataclass(frozen=True)
class ResolvedLayout:
    depths: tuple[int, ...]
    windows: tuple[int | None, ...]
    stage_of: tuple[int, ...]
    stage_ends: tuple[int, ...]
    joinable: bool = False  # a class token can join at the first global block (none windowed after it)

    @property
    def num_stages(self) -> int:
        return len(self.depths)


def detection_global_blocks(depth: int) -> tuple[int, ...]:
    """Global blocks of the paper's detection backbone for a ``depth``-block ViT.

    The plain baseline (ViTDet) has four evenly spaced global blocks: indices d/4-1, d/2-1, 3d/4-1, d-1
    (2, 5, 8, 11 for ViT-B). The transformed backbone windows the first and keeps the last three.
    """
    return baseline_global_blocks(depth)[1:]


def baseline_global_blocks(depth: int) -> tuple[int, ...]:
    """The plain ViTDet baseline's four evenly spaced global-attention blocks (0-based)."""
    if depth % 4:
        q = depth / 4
        return tuple(int(round(q * (i + 1))) - 1 for i in range(4))
    q = depth // 4
    return tuple(q * (i + 1) - 1 for i in range(4))


# What starts the classification presets closest to the plain model, chosen by the study in
# docs/classification.md: the source's class token kept (joined at the first global block, classifying
# with the source's head) and replicate-padded pools. hpvit 0.1's behaviour: class_token="drop",
# head="avg", pool_padding="zeros".
_CLS_START = dict(class_token="auto", head="auto", pool_padding="replicate")

# hpvit's own grid-* presets (not the paper's): phase attention in the stages finer than the patch, phase-
# aligned subsample + conv pools, the position embedding sampled onto every phase and, for classification,
# the source's class token from block 1 with a copy per phase group. At initialisation the 1/16 stage
# computes exactly the plain model's blocks on the image shifted by the embedding's padding (tested against
# timm). Dense variants keep their plain baseline's layout inside each phase grid. See docs/design.md.
# sub_phase=1: the surviving phase sees the image shifted by 2 px instead of 6 (measured at initialisation on
# the ImageNet sample: 36% vs 24% top-1 at 112 px, plain 37%; 81% vs 80% at 224 px, plain 81%)
# Pools: the pure subsample (no pool conv; `subconv` adds the zero-initialised 3x3/2 conv). In the study the
# convs, trained from zero at the base lr, cost every classification split ~6 points at 93 steps (seed 0:
# 41.9-42.5 vs 48.2-48.5) and grid-seg 2 mIoU on CamVid (19.7 vs 21.7, 3 seeds); docs/classification.md.
_GRID = dict(attention="phase", pools=("sub", "sub", "sub"), pos_embed_sampling="phase",
             window_sizes=(None, None, None, None), sub_phase=1)
_GRID_CLS = dict(_GRID, class_token="auto", head="auto")

PRESETS: dict[str, HPViTConfig] = {
    "paper-cls": HPViTConfig(name="paper-cls", **_CLS_START),
    "paper-det": HPViTConfig(
        name="paper-det",
        window_sizes=(7, 7, 14, 14),
        global_blocks="det",
        head="none",
    ),
    "paper-seg": HPViTConfig(
        name="paper-seg",
        pools=("avgconv", "avgconv", "max"),
        head="none",
    ),
    # efficiency presets: paper-cls with fewer blocks in the expensive high-resolution stages
    # (measured in docs/performance.md); all four levels 1/4..1/32 and every pre-trained block kept
    "fast-cls": HPViTConfig(name="fast-cls", depth_split="fast", **_CLS_START),
    "lite-cls": HPViTConfig(name="lite-cls", depth_split="lite", **_CLS_START),
    "grid-cls": HPViTConfig(name="grid-cls", **_GRID_CLS),
    "grid-fast-cls": HPViTConfig(name="grid-fast-cls", depth_split="fast", **_GRID_CLS),
    "grid-lite-cls": HPViTConfig(name="grid-lite-cls", depth_split="lite", **_GRID_CLS),
    # plain-det's layout (14x14 windows, four evenly spaced global blocks) inside every phase grid
    "grid-det": HPViTConfig(name="grid-det", head="none", **dict(_GRID, window_sizes=(14, 14, 14, 14)),
                            global_blocks="baseline"),
    # plain-seg's layout (all global, BEiT) inside every phase grid
    "grid-seg": HPViTConfig(name="grid-seg", head="none", **_GRID),
    "identity": HPViTConfig(
        name="identity",
        patch_stride=None,
        num_stages=1,
        window_sizes=(None,),
        pools=(),
        rel_pos=False,
        head="auto",
        keep_prefix_tokens=True,
    ),
    # the paper's plain baselines for dense prediction (models/dense.py adds the simple feature pyramid):
    # ViTDet's 14x14 windows with four evenly spaced global blocks, and BEiT's all-global ViT
    "plain-det": HPViTConfig(
        name="plain-det", patch_stride=None, num_stages=1, window_sizes=(14,), global_blocks="baseline", pools=(),
        head="none", rel_pos=True,
    ),
    "plain-seg": HPViTConfig(
        name="plain-seg", patch_stride=None, num_stages=1, window_sizes=(None,), pools=(), head="none",
        rel_pos=False,
    ),
}
DENSE_PRESETS = ("paper-det", "paper-seg", "grid-det", "grid-seg", "plain-det", "plain-seg")

# The preset each task starts from by default (every command's --config default; the README's recommendation,
# chosen by the study in docs/classification.md): hpvit's grid-* presets start at the plain model's function.
RECOMMENDED = {"cls": "grid-lite-cls", "det": "grid-det", "seg": "grid-seg"}


def presets_for(task: str) -> list[str]:
    """The presets made for ``task`` ("cls", "det" or "seg"): for ``cls`` every preset with a classifier head
    (``identity`` is the plain model), else the dense presets named for the task. The recommended one first,
    then the other ``grid-*`` presets, then the rest in registry order."""
    if task not in RECOMMENDED:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(RECOMMENDED)}")
    if task == "cls":
        names = [n for n, c in PRESETS.items() if c.head != "none"]
    else:
        names = [n for n in DENSE_PRESETS if n.endswith("-" + task)]
    return sorted(names, key=lambda n: (n != RECOMMENDED[task], not n.startswith("grid-")))


def get_config(config: "str | HPViTConfig | dict | None", **overrides: Any) -> HPViTConfig:
    """A config from a preset name, a JSON file of HPViTConfig fields (fields it leaves out keep their
    defaults), a dict, or a config instance, with ``overrides`` applied. Always a fresh copy."""
    if config is None:
        config = "paper-cls"
    if isinstance(config, HPViTConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = HPViTConfig.from_dict(config)
    elif isinstance(config, (str, Path)):
        where, d = name_or_json(config, list(PRESETS), "config preset")
        cfg = PRESETS[where] if d is None else HPViTConfig.from_dict(d, where)
    else:
        raise ConfigError(f"config must be a preset name, JSON file, dict or HPViTConfig, got {type(config).__name__}")
    return cfg.replace(**overrides) if overrides else dataclasses.replace(cfg)


def list_presets() -> list[str]:
    return sorted(PRESETS)
