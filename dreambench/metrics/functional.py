"""Small pure helpers of the protocol: the CLIP-T text rule and the bootstrap over subjects."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

CLIP_T_RULES = ("without_identifier", "with_identifier")


def strip_identifier(prompt: str, identifier: str | None) -> str:
    # "a sks dog in the jungle" -> "a dog in the jungle": the rare token means nothing to CLIP (PROTOCOL.md,
    # CLIP-T choice). Whole words only, so "sks" never eats part of "sksoup"; spaces collapse.
    if not identifier:
        return " ".join(prompt.split())
    words = [w for w in prompt.split() if w != identifier]
    return " ".join(words)


def clip_t_text(prompt: str, identifier: str | None, rule: str = "without_identifier") -> str:
    if rule not in CLIP_T_RULES:
        raise ValueError(f"clip_t_text must be one of {CLIP_T_RULES}, got {rule!r}")
    if rule == "with_identifier":
        return " ".join(prompt.split())
    # A multi-word identifier ("sks xjy") is removed as a phrase, word by word.
    for part in (identifier or "").split():
        prompt = strip_identifier(prompt, part)
    return strip_identifier(prompt, None)


def bootstrap_ci(values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile bootstrap of the mean over subjects (resampling subjects with replacement)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(int(samples), len(v)))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"
