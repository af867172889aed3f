"""One process writes a run folder at a time.

Two runs given the same folder would otherwise both finish with a silent mix of configs, models, CSV rows and
checkpoints. The lock is `fcntl.flock` on `<run>/.lock`, held open for the run's life: the kernel drops it when
the process dies however it dies (SIGKILL, OOM), so a crashed run never blocks the next one. The owner's host
and pid are written into the file only to name it in the refusal. A clean release deletes the file (the run
folder holds only the run's own files); a file left behind means the owner died holding it (a stale lock,
taken over with a warning). Deleting a lock file is safe because a taker checks, once locked, that the file it
locked is still the one at that path, and starts over if not. flock does not reach across hosts on every
shared filesystem, so an owner on another host is taken at its word and refused.

Rank 0 owns the lock; DDP children (launch_rank() > 0) write nothing to the folder and never take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from dreambench.errors import UserError

log = logging.getLogger("dreambench")

LOCK_NAME = ".lock"
# resolved run folder -> (open fd, whether acquire made the folder): the Hydra callback and train() share one lock
_held: dict[Path, tuple[int, bool]] = {}


def _owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:  # a torn write of a killed owner: it is gone either way
        return {"unreadable": raw[:80].decode(errors="replace")}


def _describe(owner: dict) -> str:
    if not owner.get("pid"):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["since"])) if owner.get("since") else "?"
    return f"pid {owner['pid']} on host {owner.get('host', '?')} (since {since})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def acquire(run_dir: str | Path) -> Path:
    """Take `<run_dir>/.lock` for this process (a no-op if it already holds it); UserError if a live run has it."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held:
        return run_dir / LOCK_NAME
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise UserError(f"run folder {run_dir} is in use by {_describe(owner)}: another run is writing it; "
                            f"wait for it to end or give this run another folder (hydra.run.dir=...)") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its owner deleted it between our open and flock (a clean release): take the new one
    try:
        owner = _owner(fd)
        here = socket.gethostname()
        if owner and owner.get("host") not in (None, here):
            # Another host's flock may not reach us (NFS): its run may be alive. Only a person can tell.
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise UserError(f"run folder {run_dir} is locked by {_describe(owner)}: if that run is gone, delete "
                            f"{path} and run again")
        if owner and owner.get("pid") != os.getpid():
            if owner.get("pid") and _alive(int(owner["pid"])):  # pid reused since; our flock proves it let go
                log.warning("run folder %s: lock of %s was not released; taking it over", run_dir, _describe(owner))
            else:
                log.warning("run folder %s: stale lock of %s (gone) taken over", run_dir, _describe(owner))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"host": here, "pid": os.getpid(), "since": time.time()}).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    _held[key] = (fd, made)
    return path


def release(run_dir: str | Path) -> None:
    """Delete the lock file (a clean end) and drop the lock; a no-op if this process does not hold it."""
    key = Path(run_dir).resolve()
    fd, made = _held.pop(key, (None, False))
    if fd is None:
        return
    try:  # deleted while still locked: a waiting taker sees the inode change and starts over
        os.unlink(key / LOCK_NAME)
    except OSError:  # e.g. the folder was removed under us: the flock goes with the fd anyway
        pass
    os.close(fd)  # closing the only descriptor releases the flock
    if made:  # a run stopped before writing anything (bad input) leaves no empty folder behind
        with contextlib.suppress(OSError):
            key.rmdir()  # only if empty


def holds(run_dir: str | Path) -> bool:
    return Path(run_dir).resolve() in _held
