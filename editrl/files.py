"""What editrl does to a user's files, each in one place: the output guard, the run lock, containment.

Every command that writes names what it will write and what it reads; `check_output` refuses an output that is an
input, holds one, or cannot be written, before anything is computed. Inputs are compared as files, so `..`,
symbolic and hard links are seen through.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

from editrl.base import DataError, TrainingError


def resolved(path: str | Path) -> Path:
    """The absolute path with every link followed (what is really read or written)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def within(path: str | Path, root: str | Path) -> bool:
    """Whether `path` lies inside the folder `root` once links are followed (a link inside pointing out is outside)."""
    return resolved(path).is_relative_to(resolved(root))


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file however they are spelt (`..`, symbolic or hard links)."""
    if resolved(a) == resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _writable_folder(folder: Path) -> str | None:
    """Why nothing can be created in `folder` (its nearest existing ancestor), or None. A file is really created and
    dropped (O_TMPFILE leaves no name behind), so a read-only mount, an immutable folder or a full quota all show."""
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"{folder} is not writable ({e.strerror})"
    return None


def check_output(
    out: Path,
    inputs: Iterable[Path] = (),
    flag: str = "--out",
    folder: bool = False,
    writes: Iterable[str] = (),
    suffix: str | None = None,
) -> None:
    """Refuses, before any work, an output that would overwrite or remove an input, or that cannot be written.

    A file output (`folder=False`) must not be an input. A folder output writes or replaces the entries `writes` in it
    (files, or folders it empties): none may be an input or hold one. DataError, one line naming `flag`.
    """
    out = Path(out)
    if suffix is not None and out.suffix.lower() != suffix:
        raise DataError(f"{flag} {out}: give a path ending in {suffix}")
    inputs = [Path(p) for p in inputs]
    targets = [out / name for name in writes] if folder else [out]
    for target in targets:
        for path in inputs:
            same = same_file(target, path)
            if not same and not (target.is_dir() and within(path, target)):
                continue
            if not folder:
                raise DataError(f"{flag} {out} is the input {path}: choose another path (the input would be overwritten)")
            what = "is the input" if same else "holds the input"
            raise DataError(f"{flag} {out}: {target} (which it replaces) {what} {path}: choose another path")
    if folder and out.exists() and not out.is_dir():
        raise DataError(f"{flag} {out} is a file: give a folder")
    if not folder and out.is_dir():
        raise DataError(f"{flag} {out} is a folder: give a file path" + (f" ending in {suffix}" if suffix else ""))
    problem = _writable_folder(out if folder else out.absolute().parent)
    if problem is None and not folder and out.exists() and not os.access(out, os.W_OK):
        problem = f"{out} is read-only"
    if problem is not None:
        raise DataError(f"{flag} {out}: cannot write there ({problem}); choose another path")


def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """`json.loads(..., object_pairs_hook=unique_keys)`: a key given twice in one object is a ValueError, never "the
    last one wins" (a manifest row with two `source`s, a DeepSpeed config with two `zero_optimization`s)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} is given twice")
        out[key] = value
    return out


def disk_full(error: BaseException) -> bool:
    """Whether an error means the disk (or the user's quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


# ---------------------------------------------------------------- one process per run directory


def check_flags(resume: bool, overwrite: bool, accept_changes: bool = False) -> None:
    """Refuses what a run is told to do to its directory when it contradicts itself, before anything is read."""
    if resume and overwrite:
        raise TrainingError("--resume continues the run and --overwrite starts it over: pass one of them")
    if accept_changes and not resume:
        raise TrainingError("--accept-changes lets --resume continue with a changed recipe: use it with --resume")


LOCK_NAME = ".editrl.lock"
logger = logging.getLogger(__name__)
_held: dict[Path, list[int]] = {}  # run directory -> [file descriptor, holders in this process, signed]


def _holder(fd: int) -> str:
    """Who holds a lock file, as it says itself: `process PID on HOST (COMMAND, since HH:MM:SS)`."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 65536) or b"{}")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"process {info['pid']} on {info['host']} ({info['command']}, since {when})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """An exclusive lock on a run directory for as long as a run writes there (`flock` on RUN/.editrl.lock).

    The kernel drops it when the process ends, however it ends, so a crash leaves no stale lock. The lock file names its
    holder for whoever is refused. It is shared inside one process (a second `Harness` on the same directory in the same
    Python process is the caller's own doing); another process is refused at once.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = resolved(run_dir)
        self.held = False

    def acquire(self) -> None:
        """Take the lock or raise TrainingError naming the process that holds it."""
        if self.held:
            return
        if self.path in _held:
            _held[self.path][1] += 1
            self.held = True
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TrainingError(f"run.output_dir: cannot write to {self.path} ({e.strerror}): choose a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _in_use(self.path, holder) from None
        except OSError as e:  # a filesystem without locks: say so once, and go on unguarded
            logger.warning("cannot lock %s (%s): nothing stops another process from writing there meanwhile",
                           self.path, e.strerror)
        _held[self.path] = [fd, 1, 0]
        self.held = True

    def sign(self) -> None:
        """Write who holds the lock into it, for whoever is refused (once the run is sure to start: a run refused for
        another reason leaves the file as it was)."""
        program = Path(sys.argv[0])
        name = program.parent.name if program.name == "__main__.py" else program.name  # `python -m editrl`: editrl
        command = " ".join(shlex.quote(a) for a in [name, *sys.argv[1:]])[:200]
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()}
        fd = _held[self.path][0]
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[self.path][2] = 1

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        entry = _held[self.path]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.path]
            if entry[2]:
                os.ftruncate(entry[0], 0)  # no holder to name any more
            os.close(entry[0])  # closing drops the flock

    def __del__(self) -> None:
        self.release()


def _in_use(run_dir: Path, holder: str) -> TrainingError:
    return TrainingError(
        f"{run_dir} is in use by {holder}: two runs in one directory would overwrite each other's checkpoints; wait "
        "for it to end (or stop it), or choose another run.output_dir"
    )


def refuse_if_in_use(run_dir: Path) -> None:
    """The lock's refusal, said early (before a command loads its models); taking the lock is still what decides."""
    holder = run_in_use(run_dir)
    if holder is not None:
        raise _in_use(resolved(run_dir), holder)


def run_in_use(run_dir: Path) -> str | None:
    """Who holds `run_dir`'s lock (another process), or None when no run writes there now; takes nothing."""
    path = resolved(run_dir)
    if path in _held or not (path / LOCK_NAME).is_file():
        return None
    fd = os.open(path / LOCK_NAME, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)
    return None
