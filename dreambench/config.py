"""Config checks run at start-up, before any model loads; and what may be written out of a config."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dreambench.errors import UserError

SECRET = re.compile(r"(api[_-]?key|token|password|passwd|secret|credential)", re.I)
REDACTED = "***"


def missing_keys(cfg: Any, prefix: str = "") -> list[str]:
    """`???` values, without resolving interpolations (OmegaConf.missing_keys raises on an interpolation
    that points at a missing value, e.g. run_name: ${data.subject})."""
    out: list[str] = []
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    for k in keys:
        path = f"{prefix}{k}" if isinstance(cfg, DictConfig) else f"{prefix[:-1]}[{k}]"
        if OmegaConf.is_missing(cfg, k):
            out.append(path)
        elif not OmegaConf.is_interpolation(cfg, k):
            v = cfg[k]
            if OmegaConf.is_config(v):
                out.extend(missing_keys(v, path + "."))
    return out


def check_missing(cfg: DictConfig, hint: str = "") -> None:
    missing = sorted(missing_keys(cfg))
    if missing:
        raise UserError(f"missing required config value(s): {', '.join(missing)}{hint}")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, with secrets replaced: this is all that reaches run folders and W&B."""
    return redact(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: (REDACTED if SECRET.search(str(k)) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj
