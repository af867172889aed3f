"""Checkpoints that are complete or absent, exact-resume RNG state, and finding what to resume from.

Lightning 2.6's TorchCheckpointIO serialises into memory and then writes the final path in place
(`fabric.utilities.cloud_io._atomic_save` is atomic only against exceptions during `torch.save`): a process
killed during the write, or a full disk, leaves a truncated `step=….ckpt` that `resume=auto` would then pick.
AtomicCheckpointIO writes a hidden temporary sibling, fsyncs it, renames it over the final name and fsyncs the
folder; it prunes older checkpoints only after that rename, so the newest complete one always survives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from dreambench.utils.io import atomic_write, safe_rmtree

log = logging.getLogger("dreambench")

CKPT_NAME = re.compile(r"^step=(\d+)\.ckpt$")
TMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")


def checkpoint_name(step: int) -> str:
    # One name for periodic and preemption checkpoints: the step orders them, and pruning treats them alike.
    return f"step={step:06d}.ckpt"


def checkpoint_step(path: str | Path) -> int | None:
    m = CKPT_NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete_checkpoint(path: str | Path) -> bool:
    """A torch.save file is a zip whose central directory is written last: a truncated file has none.
    Reading the directory costs a few KB, not the whole (multi-GB) checkpoint."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def find_latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete `step=N.ckpt` with the largest N in folder (None if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(((checkpoint_step(p), p) for p in folder.iterdir() if checkpoint_step(p) is not None), reverse=True)
    for _, p in found:
        if is_complete_checkpoint(p):
            return p
        log.warning("skipping incomplete checkpoint %s", p)
    return None


def is_auto(value: Any) -> bool:
    return str(value) == "auto"


def finished_steps(run_dir: str | Path) -> int | None:
    """A finished run's step count (metrics.json is written last, only by a run that finished), else None."""
    import json
    f = Path(run_dir) / "metrics.json"
    if not f.is_file():
        return None
    try:
        return int(json.loads(f.read_text()).get("steps", -1))
    except (ValueError, OSError, AttributeError):
        return -1  # unreadable, but it is there: still a finished run's file, never to be overwritten


def finished_and_left_alone(resume: Any, run_dir: str | Path) -> int | None:
    """resume=auto on a finished run: its step count (nothing of it is to be written), else None."""
    return finished_steps(run_dir) if is_auto(resume) else None


def is_fresh(resume: Any) -> bool:
    """resume=null (or false, none, ""): a fresh start."""
    return resume is None or resume is False or str(resume).strip().lower() in ("", "none", "null", "false")


def run_held(run_dir: str | Path) -> list[str]:
    """What of a run `run_dir` holds that a fresh start would overwrite: metrics.json, model/, checkpoints."""
    run = Path(run_dir)
    return [name for name, there in (("metrics.json", (run / "metrics.json").is_file()),
                                     ("model/", (run / "model").exists()),
                                     ("checkpoints", find_latest_checkpoint(run / "checkpoints") is not None))
            if there]


def resolve_resume(value: Any, run_dir: str | Path) -> Path | None:
    """`resume`: null (fresh start) | auto (newest complete checkpoint of <run_dir>/checkpoints, or a fresh
    start if there is none) | a checkpoint file | a run or checkpoints folder. Raises ValueError naming the
    problem, before any model loads. A fresh start into a folder that holds a run (finished, trained or
    checkpointed) is refused too: it would overwrite that run."""
    if is_fresh(value):
        held = run_held(run_dir)
        if held:
            raise ValueError(f"{run_dir} already holds a run ({', '.join(held)}); a fresh run there would overwrite "
                             f"it: resume=auto continues it, or give the new run another folder (hydra.run.dir=...)")
        return None
    if is_auto(value):
        found = find_latest_checkpoint(Path(run_dir) / "checkpoints")
        if found is None and (Path(run_dir) / "model").exists():  # a fresh start would overwrite a trained model
            raise ValueError(f"resume=auto: {run_dir} holds a trained model/ but no checkpoint to continue from; "
                             f"starting afresh would overwrite it: give this run another folder (hydra.run.dir=...)")
        log.info("resume=auto: %s", f"continuing from {found}" if found else f"no checkpoint in {run_dir}, "
                 "starting fresh")
        return found
    p = Path(str(value)).expanduser()
    if p.is_dir():
        found = find_latest_checkpoint(p / "checkpoints") or find_latest_checkpoint(p)
        if found is None:
            raise ValueError(f"resume={value}: no complete step=N.ckpt checkpoint in that folder")
        return found
    if not p.is_file():
        raise ValueError(f"resume={value}: no such checkpoint file")
    if not is_complete_checkpoint(p):
        raise ValueError(f"resume={value}: not a complete checkpoint (truncated, or not a torch.save file)")
    return p


def _remove_stale_temporaries(folder: Path) -> None:
    # A writer killed mid-save leaves `.step=N.ckpt.tmp-<pid>-<hex>`; delete it once that pid is gone.
    for p in folder.iterdir():
        m = TMP_NAME.match(p.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError, ValueError):
                safe_rmtree(p, folder)
        except PermissionError:  # alive, someone else's
            pass


def prune_checkpoints(folder: str | Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest complete step=N checkpoints; returns what was deleted."""
    folder = Path(folder)
    complete = sorted((p for p in folder.iterdir() if checkpoint_step(p) is not None and is_complete_checkpoint(p)),
                      key=lambda p: checkpoint_step(p), reverse=True)
    gone = complete[keep:] if keep > 0 else []
    for p in gone:
        try:
            safe_rmtree(p, folder)  # never outside the checkpoints folder, not through a symlink
        except ValueError as e:  # e.g. a symlink to a file elsewhere: left alone, training goes on
            log.warning("not pruning %s: %s", p, e)
    _remove_stale_temporaries(folder)
    return gone


class AtomicCheckpointIO(TorchCheckpointIO):
    """`keep`: how many step=N checkpoints to keep (None: all). ModelCheckpoint is run with save_top_k=-1 so
    that this is the only pruning, and it also covers the preemption checkpoints ModelCheckpoint never saw."""

    def __init__(self, keep: int | None = None):
        self.keep = keep

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        # Streamed to the file (no second in-memory copy of a multi-GB checkpoint), fsynced, renamed.
        atomic_write(path, lambda f: torch.save(checkpoint, f))
        if self.keep is not None and checkpoint_step(path) is not None:
            prune_checkpoints(path.parent, self.keep)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only=True: a checkpoint is data (tensors, numbers, strings, lists), never code. Everything
        # dreambench puts in one is of that kind (RNG states are converted to lists, see capture_rng).
        return super().load_checkpoint(path, map_location=map_location or (lambda s, loc: s),
                                       weights_only=True if weights_only is None else weights_only)

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        safe_rmtree(path, path.parent)


# ---- RNG state for exact resume ---------------------------------------------------------------------------

def capture_rng(noise_generator: torch.Generator | None = None) -> dict[str, Any]:
    """This process's RNG states as weights_only-loadable data (numpy's tuple holds an ndarray: made a list)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if noise_generator is not None:
        state["noise"] = noise_generator.get_state()
    return state


def restore_rng(state: dict[str, Any] | None, noise_generator: torch.Generator | None = None) -> None:
    if not state:
        return
    if "python" in state:
        random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if noise_generator is not None and "noise" in state:
        noise_generator.set_state(state["noise"])


def gather_rng(trainer: Any, noise_generator: torch.Generator | None) -> dict[str, Any]:
    """Every rank's states, for the checkpoint that rank 0 writes: {"ranks": [state_0, state_1, ...]}.
    `on_save_checkpoint` runs on all ranks (Lightning dumps everywhere, writes on rank 0), so a collective is safe."""
    mine = capture_rng(noise_generator)
    world = int(getattr(trainer, "world_size", 1) or 1)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        states: list[Any] = [None] * world
        torch.distributed.all_gather_object(states, mine)
        return {"ranks": states}
    return {"ranks": [mine]}


def rank_state(saved: dict[str, Any] | None, rank: int) -> dict[str, Any] | None:
    if not saved:
        return None
    if "ranks" not in saved:  # checkpoints written before per-rank states: the noise generator only
        return {"noise": saved["noise"]} if "noise" in saved else None
    ranks = saved["ranks"]
    if rank >= len(ranks):
        log.warning("checkpoint holds RNG states of %d ranks, this is rank %d: not restored", len(ranks), rank)
        return None
    return ranks[rank]
