"""Runs that survive faults: atomic checkpoints, exact resume, preemption, non-finite numerics.

`train.py` wires these in; each piece is a Lightning plugin or callback, or a pure function, tested on its own
and end to end (tests/test_resume*.py, test_preempt*.py, test_atomic_ckpt*.py, test_numerics*.py).
"""

from dreambench.resilience.checkpoint import (
    AtomicCheckpointIO,
    capture_rng,
    checkpoint_step,
    find_latest_checkpoint,
    is_complete_checkpoint,
    resolve_resume,
    restore_rng,
)
from dreambench.resilience.numerics import NonFiniteError, NumericsGuard, keep_vae_fp32
from dreambench.resilience.preempt import RESUMABLE_EXIT_CODE, Preemption

__all__ = [
    "RESUMABLE_EXIT_CODE",
    "AtomicCheckpointIO",
    "NonFiniteError",
    "NumericsGuard",
    "Preemption",
    "capture_rng",
    "checkpoint_step",
    "find_latest_checkpoint",
    "is_complete_checkpoint",
    "keep_vae_fp32",
    "resolve_resume",
    "restore_rng",
]
