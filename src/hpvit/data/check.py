"""Checking a dataset before training, and leaving out bad training images on request.

A dataset takes part by defining ``check_item(i, full)``: ``full=True`` decodes sample ``i`` completely
(image and labels, with every value check), ``full=False`` only opens the files' headers (fast); both
raise :class:`~hpvit.errors.DataError` naming the file. Datasets without the method are checked by
loading the sample (full) or not at all (header).

:func:`find_bad_items` runs the check over a whole dataset (in parallel with DataLoader workers, with
a tqdm bar on a terminal for large sets) and returns every failure instead of stopping at the first.
:class:`SkipBadImages` wraps a training set so that unreadable images are left out and listed in the
run folder (``--skip-bad-images``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from tqdm import tqdm

from ..errors import BadImageError, DataError

PROGRESS_MIN_ITEMS = 500  # below this, a check is too quick for a progress bar


class BadItem(NamedTuple):
    index: int
    path: str
    message: str
    unreadable: bool  # True: the image cannot be decoded (skippable); False: invalid content (labels...)


class _CheckView(torch.utils.data.Dataset):
    """``view[i]`` -> None when sample ``i`` passes, else a :class:`BadItem` (never raises DataError)."""

    def __init__(self, ds, full: bool):
        self.ds, self.full = ds, full
        self.fn = getattr(ds, "check_item", None)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> BadItem | None:
        try:
            if self.fn is not None:
                self.fn(i, self.full)
            elif self.full:
                self.ds[i]
        except DataError as e:
            return BadItem(i, e.path or "?", str(e), isinstance(e, BadImageError))
        return None


def _log(msg: str) -> None:
    print(f"[hpvit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def find_bad_items(ds, full: bool, desc: str, num_workers: int = 0) -> list[BadItem]:
    """Check every sample of ``ds`` (see the module docstring); returns the failures in index order."""
    n = len(ds)
    loader = torch.utils.data.DataLoader(_CheckView(ds, full), batch_size=8, num_workers=num_workers,
                                         collate_fn=list, shuffle=False)
    bar = None
    big = n >= PROGRESS_MIN_ITEMS
    if big and sys.stderr.isatty() and not os.environ.get("HPVIT_PLAIN_LOG"):
        bar = tqdm(total=n, desc=desc, unit="img", dynamic_ncols=True, leave=False)
    elif big:
        _log(f"{desc}: {n} images ...")
    bad: list[BadItem] = []
    t0 = time.time()
    for chunk in loader:
        bad.extend(b for b in chunk if b is not None)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if big:
        _log(f"{desc}: {n} images in {time.time() - t0:.0f}s, {len(bad)} bad")
    return bad


def describe_bad(bad: Sequence[BadItem], split: str, total: int, hint: str) -> str:
    """One message for a list of failures: the count, the first few files with what is wrong, the fix."""
    head = f"{len(bad)} of {total} {split} image(s) failed the check before training: "
    shown = "; ".join(b.message for b in bad[:3])
    more = f"; ... and {len(bad) - 3} more" if len(bad) > 3 else ""
    return head + shown + more + (f". {hint}" if hint else "")


def write_skipped(path: Path, items: Sequence[tuple[str, str]]) -> None:
    """Append ``path<TAB>reason`` lines to the skipped-images list (one small append per line)."""
    with open(path, "a") as f:
        for p, why in items:
            f.write(f"{p}\t{' '.join(why.split())}\n")


def read_skipped(path: Path) -> list[tuple[str, str]]:
    """The distinct ``(path, reason)`` entries of a skipped-images list, in first-seen order."""
    if not Path(path).is_file():
        return []
    seen: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        p, _, why = line.partition("\t")
        seen.setdefault(p, why)
    return list(seen.items())


class SkipBadImages(torch.utils.data.Dataset):
    """A training set without the samples ``exclude`` (found bad before training); a sample that fails to
    decode during training (:class:`~hpvit.errors.BadImageError`) is listed in ``report`` once and replaced
    by the next readable one, so an epoch keeps its length and order is still a function of the seed."""

    def __init__(self, ds, report: Path, exclude: Sequence[int] = ()):
        self.dataset, self.report = ds, Path(report)
        drop = set(exclude)
        self.keep = [i for i in range(len(ds)) if i not in drop]
        if not self.keep:
            raise DataError(f"every training image is unreadable (see {self.report}); check the --data path")
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.keep)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int):
        for k in range(len(self.keep)):
            j = self.keep[(i + k) % len(self.keep)]
            try:
                return self.dataset[j]
            except BadImageError as e:
                if (e.path or "?") not in self._reported:
                    self._reported.add(e.path or "?")
                    write_skipped(self.report, [(e.path or "?", str(e))])
        raise DataError(f"every training image is unreadable (see {self.report}); check the --data path")


def unwrap_worker_error(e: DataError) -> DataError:
    """A DataError re-raised by a DataLoader worker carries the worker's traceback in its message; return
    one with just the original message (which names the file)."""
    text = str(e)
    if not text.startswith("Caught "):
        return e
    tail = [ln for ln in text.splitlines() if ln.strip()]
    last = tail[-1] if tail else text
    prefix = f"{type(e).__module__}.{type(e).__name__}: "
    msg = last[len(prefix):] if last.startswith(prefix) else last
    return type(e)(msg, getattr(e, "path", None))
