"""Small helpers every part of hpvit uses (the bottom of the chain, beside ``errors``).

* atomic file writes: :func:`atomic_write` / :func:`write_text_atomic` (every file hpvit writes goes
  through them: a destination is never left half-written; temp files of killed writers are cleaned);
* :class:`DictIO`: ``to_dict`` / ``to_json`` / ``from_dict`` for the dataclasses hpvit stores in files
  (configs, recipes, plain specs), with unknown keys refused by name (defined in the torch-free
  :mod:`hpvit.dictio`, with :func:`name_or_json`, and re-exported here);
* :func:`count_flops`: forward FLOPs with ``torch.utils.flop_counter`` (2 FLOPs per multiply-add).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import re
import secrets
import shutil
import stat
import types
import typing
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .dictio import DictIO, field_type_problems, name_or_json  # noqa: F401 - re-exported: hpvit.utils is where the library imports them
from .errors import OutputError

# ---------------------------------------------------------------------------------------------- atomic writes
TEMP_SUFFIX = ".hpvit-tmp"


def temp_path_for(dst: Path) -> Path:
    """A fresh temporary name next to ``dst``: ``.<name>.<pid>.<random>.hpvit-tmp`` (same folder, so the final
    rename is atomic; the pid lets :func:`clean_stale_temps` tell a dead writer's leftovers from a live one's)."""
    return dst.with_name(f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(folder: "str | os.PathLike", name: str | None = None) -> list[Path]:
    """Delete hpvit temp files in ``folder`` (only those for target ``name`` when given) whose writing process
    is gone (killed mid-write). Returns the deleted paths. Files of live processes (this one included) are left
    alone."""
    d = Path(folder)
    if not d.is_dir():
        return []
    removed = []
    for f in d.glob(f".{name or '*'}.*{TEMP_SUFFIX}"):
        parts = f.name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if _pid_alive(pid):  # this process's own temps included: another thread may be writing one right now
            continue
        try:
            f.unlink()
            removed.append(f)
        except OSError:
            pass
    return removed


def _target_mode(dst: Path) -> int:
    """The mode a new ``dst`` gets: that of the file it replaces, else 0o666 minus the umask (like ``open``)."""
    try:
        return stat.S_IMODE(dst.stat().st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def write_error(dst: Path, e: BaseException) -> OutputError:
    """An :class:`OutputError` for a failed write of ``dst``: names the target (never a temp file) and the fix."""
    free = ""
    try:
        free = f"; {shutil.disk_usage(dst.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        pass
    err = getattr(e, "errno", None)
    text = str(e)
    if err is None:  # safetensors' SafetensorError carries the OS error only in its text: "... (os error 28)"
        m = re.search(r"os error (\d+)", text)
        err = int(m.group(1)) if m else None
    if err == errno.ENOSPC or "unexpected pos" in text or "failed writing" in text or "No space left" in text:
        return OutputError(f"cannot write {dst}: the disk is full{free}; free some space or choose an output on "
                           "another disk, then run again")
    if err in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the file system is read-only" if err == errno.EROFS else "permission denied"
        return OutputError(f"cannot write {dst}: {why}; choose a writable output folder (or fix the folder's "
                           "permissions)")
    return OutputError(f"cannot write {dst} ({type(e).__name__}: {text.splitlines()[0][:200] if text else ''}); "
                       f"check that {dst.parent} is writable and has free space{free}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], force: bool = False) -> Path:
    """Call ``write(tmp_path)`` then atomically rename onto ``path``.

    The destination is never left half-written: either the old file (or nothing) or the complete new one.
    The temp file (``.<name>.<pid>.<random>.hpvit-tmp``) sits next to ``path``; leftovers of killed writers
    are removed on the next write of the same target. The result keeps the mode of the file it replaces,
    else gets the umask's default. Refuses to replace an existing file unless ``force``. Failures to write
    (read-only folder, disk full...) raise :class:`~hpvit.errors.OutputError` naming ``path``.
    """
    dst = Path(path)
    if dst.is_dir():
        raise OutputError(f"cannot write {dst}: it is a folder; give a file path (e.g. {dst / 'model.safetensors'}) "
                          "or remove the folder")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; refusing to overwrite it (use --overwrite / force=True to replace it)")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(dst, e) from e
    clean_stale_temps(dst.parent, dst.name)
    mode = _target_mode(dst)
    tmp = temp_path_for(dst)
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dst)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _is_write_failure(e):
            raise write_error(dst, e) from e
        raise
    return dst


def _is_write_failure(e: BaseException) -> bool:
    """An exception a writer raises because the file could not be written (an OS error, PyTorch's
    ``RuntimeError: ... unexpected pos``, safetensors' ``SafetensorError``), not a bug or an interrupt."""
    if isinstance(e, FileExistsError) or not isinstance(e, Exception):
        return False
    return isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError"


def write_text_atomic(path: "str | os.PathLike", text: str) -> Path:
    """Replace the text file ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), force=True)


# ---------------------------------------------------------------------------------------------- FLOPs
def count_flops(fn: "nn.Module | Callable[..., Any]", *args: Any) -> int:
    """Forward FLOPs of ``fn(*args)`` under no_grad, counted by ``torch.utils.flop_counter`` (2 FLOPs per
    multiply-add; attention matmuls included). A module runs in eval mode for the count (its training
    mode is restored); any other callable (e.g. a lambda that stops a forward early) runs as is."""
    module = fn if isinstance(fn, nn.Module) else None
    was = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn(*args)
    finally:
        if module is not None:
            module.train(was)
    return int(fc.get_total_flops())
