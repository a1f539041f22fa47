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

import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from tqdm import tqdm

from ..errors import BadImageError, DataError

try:  # POSIX: DataLoader workers append to the skipped-images list under a lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)")


def escape_name(text: str) -> str:
    """``text`` on one line of a tab-separated file: ``\\``, ``\\t``, ``\\n``, ``\\r`` for backslash, tab, newline and
    carriage return, ``\\xHH`` for other control characters and for the bytes of a file name that is not UTF-8
    (Python holds those as lone surrogates, which no UTF-8 file can store). Other text is kept as it is."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's stand-in for a byte that is not UTF-8
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or o == 0x7F or 0xD800 <= o <= 0xDFFF:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_name(text: str) -> str:
    """The inverse of :func:`escape_name` (``\\xHH`` >= 0x80 gives back the undecodable byte, as os.fsdecode does)."""
    def one(m: "re.Match[str]") -> str:
        g = m.group(1)
        if len(g) > 1:
            o = int(g[1:], 16)
            return chr(0xDC00 + o) if g[0] == "x" and o >= 0x80 else chr(o)
        return {"t": "\t", "n": "\n", "r": "\r"}.get(g, g)

    return _UNESCAPE.sub(one, text)


def write_skipped(path: Path, items: Sequence[tuple[str, str]]) -> None:
    """Append ``path<TAB>reason`` lines (both escaped by :func:`escape_name`) to the skipped-images list, each image
    once: one already listed (by another DataLoader worker, or in an earlier epoch) is not listed again."""
    with open(path, "a+", encoding="utf-8") as f:
        with _locked(f):
            f.seek(0)
            listed = {line.partition("\t")[0] for line in f.read().splitlines()}
            for p, why in items:
                name = escape_name(p)
                if name not in listed:
                    listed.add(name)
                    f.write(f"{name}\t{escape_name(' '.join(why.split()))}\n")


@contextlib.contextmanager
def _locked(f):
    """An exclusive lock on the open file ``f`` where the OS has ``flock`` (DataLoader workers append concurrently)."""
    if fcntl is None:  # not on POSIX: appends of single lines, without the lock
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        f.flush()
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_skipped(path: Path) -> list[tuple[str, str]]:
    """The distinct ``(path, reason)`` entries of a skipped-images list, in first-seen order (unescaped)."""
    if not Path(path).is_file():
        return []
    seen: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        p, _, why = line.partition("\t")
        seen.setdefault(unescape_name(p), unescape_name(why))
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
