"""Crash-safe writes for run folders: a killed or failing run leaves the old file (or folder) or the new one,
never half of one. metrics.json, checkpoints and exported models are what analysis/ reads back later
(DESIGN.md, point 9), so a torn file there is a silently wrong table.

The recipe: write a temporary sibling (same directory, hence same filesystem, so the rename is atomic), flush
and fsync it, then os.replace it over the final name and fsync the directory so the rename itself survives a
power cut. On any exception the temporary is removed and the old file is untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def _tmp_sibling(path: Path, hidden: bool) -> Path:
    # pid + random: two processes (or threads) writing the same target never share a temporary.
    name = f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    return path.with_name(("." if hidden else "") + name)


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable on POSIX; directories cannot be opened this way on Windows, where the rename is
    # as durable as NTFS makes it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` streams into a hidden temporary beside `path`, which is fsynced and renamed over `path`;
    on any error the temporary goes and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden name, so globs over the folder (samples/*.png, a reader polling metrics*) never see it.
    tmp = _tmp_sibling(path, hidden=True)
    try:
        # O_EXCL: never write through someone else's file; 0o666 & ~umask, the mode a plain open() would give
        # (mkstemp's 0o600 would make exported models unreadable for a shared group).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)  # keep a mode the user chose for the file being replaced
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _finite(obj):
    # JSON has no NaN/Infinity (Python's json writes them anyway, and strict readers such as jq or JS reject
    # the file), so a diverged metric is written as null: "no valid value". Integers and numpy scalars become
    # plain numbers; anything else json cannot encode still raises TypeError, before any byte is written.
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    text = json.dumps(_finite(obj), indent=indent, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _fsync_tree(root: Path) -> None:
    # Files written into the temporary folder must be on disk before the rename publishes them, or a power
    # cut can leave a "complete" folder of empty files.
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def atomic_dir(final_path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it becomes final_path (replacing any old one).

    POSIX cannot rename a folder over a non-empty one, so the old folder is first moved aside: a crash
    between the two renames leaves `<name>.old-*` and `<name>.tmp-*` next to a missing final name, never a
    mixed folder.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final, hidden=False)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f"{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        _remove(old)


def safe_rmtree(path: str | Path, root: str | Path) -> None:
    """Delete path (a folder, file or symlink) only if it lies strictly inside root after resolving symlinks.

    The program only deletes what it created under its own output root; a config typo such as
    `paths.output_dir=..` or a symlink pointing at a user's dataset must fail loudly instead.
    A path that does not exist (but would be inside root) is nothing to do.
    """
    path, root = Path(path), Path(root)
    real_root = root.resolve()
    # resolve() follows a symlink at path itself and any symlinked parent, and collapses "..".
    target = path.resolve()
    if target == real_root or real_root not in target.parents:
        raise ValueError(f"refusing to delete {path} (resolves to {target}): it is not strictly inside "
                         f"{root} (resolves to {real_root})")
    if path.is_symlink():
        path.unlink()  # the link is ours; what it points to (inside root, checked above) is left alone
    elif path.is_dir():
        shutil.rmtree(path)  # rmtree unlinks symlinks inside the tree, never follows them
    elif path.exists():
        path.unlink()
