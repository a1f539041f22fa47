"""One output folder, one run: the run-folder lock and the overwrite policy shared by every command
that writes a training run (``hpvit train cls|det|seg`` and any later one).

:func:`claim_run_dir` is the single entry point::

    with claim_run_dir(out, resume=args.resume, overwrite=args.overwrite) as run_dir:
        ...  # write into run_dir.path; nobody else can claim it until the block ends

It (1) creates the folder, (2) takes an exclusive lock on ``OUT/.hpvit-run.lock`` -- a second run into
the same folder fails at once with :class:`~hpvit.errors.RunDirError` naming the holder (pid, host,
start time, command); the operating system drops the lock when the holder dies, even on SIGKILL, so a
lock file left by a dead run is detected as stale and taken over with a note, (3) applies the policy:

* a finished run (``results.json`` present) is never replaced unless ``overwrite`` -- whether or not
  its ``checkpoint-last.pt`` still exists; ``resume`` on it is refused too (nothing left to run);
* an unfinished run (``checkpoint-last.pt`` present) needs ``resume`` (continue) or ``overwrite``;
* ``overwrite`` only allows replacing: claiming deletes nothing. The command deletes the previous run
  (:meth:`RunDir.clear_previous_run`) once its new run has really started (model built, data checked,
  resume accepted), so a run that fails its checks leaves the old one whole;

and (4) deletes hpvit temp files (``.*.hpvit-tmp``) that killed writers left in the folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils import clean_stale_temps, write_error
from ..errors import ConfigError, RunDirError
from .logging import log

LOCK_NAME = ".hpvit-run.lock"
RESULTS_NAME = "results.json"
CHECKPOINT_NAME = "checkpoint-last.pt"
SKIPPED_NAME = "skipped-images.txt"
# what the engine writes into a run folder; deleted by --overwrite when the new run starts (results.json last)
RUN_FILES = (CHECKPOINT_NAME, "metrics.jsonl", "curves.png", SKIPPED_NAME, RESULTS_NAME)
EVENTS_GLOB = "events.out.tfevents.*"  # TensorBoard event files (engine/tensorboard.py), rebuilt from metrics.jsonl

try:  # POSIX; elsewhere the lock falls back to the pid written in the lock file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@dataclass
class RunDir:
    """A claimed run folder. ``release()`` (or leaving the ``with`` block) frees it for the next run."""

    path: Path
    lock_path: Path
    fd: int | None
    notes: list[str] = field(default_factory=list)

    def clear_previous_run(self, verbose: bool = True) -> list[str]:
        """Delete the previous run in the folder (``--overwrite``, once the new run has started): first the model
        files its results.json lists, then the engine's files, results.json last, so that at no moment is a model
        left without the record that marks the folder as a finished run. Returns the names deleted (logged)."""
        gone = [p.name for p in _previous_run_files(self.path) if _unlink(p)]
        if gone:
            log(f"--overwrite: deleted the previous run's {', '.join(gone)} in {self.path}", verbose)
        return gone

    def release(self) -> None:
        """Drop the lock and delete the lock file (only if it is still ours)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_ino == os.stat(self.lock_path).st_ino:
                os.unlink(self.lock_path)
        with contextlib.suppress(OSError):
            os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holder_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)[:500]}


def _read_holder(lock_path: Path) -> dict[str, Any]:
    try:
        d = json.loads(lock_path.read_text() or "{}")
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(out: Path, lock_path: Path, holder: dict[str, Any]) -> RunDirError:
    return RunDirError(
        f"{out} is in use by another run ({_describe(holder)}); wait for it to finish or choose another --out. "
        f"If that run is no longer alive, delete {lock_path} and try again"
    )


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: held by someone else; None: this file system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _acquire(out: Path, notes: list[str]) -> tuple[int, Path]:
    """Open and exclusively lock ``out/LOCK_NAME``; raise :class:`RunDirError` when another run holds it."""
    lock_path = out / LOCK_NAME
    for _ in range(20):  # retried only when a finishing run deletes the file between our open and lock
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_error(lock_path, e) from e
        got = _try_flock(fd)
        holder = _read_holder(lock_path)
        if got is False or (got is None and holder.get("host") == socket.gethostname()
                            and holder.get("pid") != os.getpid() and _pid_alive(holder.get("pid"))):
            os.close(fd)
            raise _busy(out, lock_path, holder)
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        if holder.get("pid") and holder.get("pid") != os.getpid():
            notes.append(f"{lock_path} was left by a run that ended without releasing it ({_describe(holder)}); "
                         "taking it over")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_holder_info()).encode())
        except OSError as e:
            os.close(fd)
            raise write_error(lock_path, e) from e
        return fd, lock_path
    raise _busy(out, lock_path, _read_holder(lock_path))


def _finished_summary(results: Path) -> str:
    try:
        d = json.loads(results.read_text())
        when = _dt.datetime.fromtimestamp(results.stat().st_mtime).isoformat(timespec="minutes")
        return f"finished {when}, {d.get('epochs', '?')} epoch(s)"
    except (OSError, ValueError, AttributeError):
        return "finished"


def check_run_policy(out: Path, resume: bool, overwrite: bool) -> None:
    """Raise :class:`RunDirError` when starting here would replace a run the user did not ask to replace."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; pass only one of them")
    results, ckpt = out / RESULTS_NAME, out / CHECKPOINT_NAME
    if overwrite:
        return
    if results.exists():
        what = f"a finished run ({RESULTS_NAME}: {_finished_summary(results)}" + (
            f", {CHECKPOINT_NAME} present)" if ckpt.exists() else f"; its {CHECKPOINT_NAME} was deleted)")
        if resume:
            raise RunDirError(f"{out} holds {what}: there is nothing left to resume. Pass --overwrite to train it "
                              "again from the start (its results and model files are replaced), or choose another --out")
        raise RunDirError(f"{out} holds {what}; refusing to replace it. Pass --overwrite to replace it, or choose "
                          "another --out")
    if ckpt.exists() and not resume:
        raise RunDirError(f"{out} holds an unfinished run ({CHECKPOINT_NAME}); pass --resume to continue it, "
                          "--overwrite to start it over, or choose another --out")


def _previous_run_files(out: Path) -> list[Path]:
    """The files of the run in ``out``, in the order they are deleted: its model files (named in results.json),
    its TensorBoard event files, then :data:`RUN_FILES` (results.json last)."""
    try:
        listed = json.loads((out / RESULTS_NAME).read_text()).get("model_files") or []
    except (OSError, ValueError, AttributeError):
        listed = []
    models = [out / Path(str(f)).name for f in listed if isinstance(f, str)]
    return [p for p in [*models, *sorted(out.glob(EVENTS_GLOB)), *(out / n for n in RUN_FILES)] if p.is_file()]


def _unlink(p: Path) -> bool:
    try:
        p.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise write_error(p, e) from e
    return True


def claim_run_dir(out: "str | os.PathLike", *, resume: bool = False, overwrite: bool = False,
                  verbose: bool = True) -> RunDir:
    """Create and lock the run folder ``out`` and apply the overwrite policy (see the module docstring).

    Returns a :class:`RunDir` (a context manager; the lock is held until ``release()``). Raises
    :class:`~hpvit.errors.RunDirError` when another live run holds the folder or when it holds a run that
    ``resume`` / ``overwrite`` do not allow replacing, :class:`~hpvit.errors.OutputError` when the folder
    cannot be written, :class:`~hpvit.errors.ConfigError` for ``resume`` together with ``overwrite``.
    Notes (stale lock taken over, temp files removed) are logged when ``verbose``.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} is a file, not a folder; choose a folder for the run's outputs")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path / LOCK_NAME, e) from e
    notes: list[str] = []
    fd, lock_path = _acquire(path, notes)
    run = RunDir(path, lock_path, fd, notes)
    try:
        check_run_policy(path, resume, overwrite)
        removed = clean_stale_temps(path)
        if removed:
            notes.append(f"removed {len(removed)} temp file(s) left by an interrupted write: "
                         + ", ".join(p.name for p in removed[:5]))
    except BaseException:
        run.release()
        raise
    for n in notes:
        log(n, verbose)
    return run
