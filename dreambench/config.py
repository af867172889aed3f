"""Config checks run at start-up, before any model loads; and what may be written out of a config."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dreambench.errors import UserError

SECRET = re.compile(r"(api[_-]?key|token|password|passwd|secret|credential)", re.I)
REDACTED = "***"


def check_missing(cfg: DictConfig, hint: str = "") -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
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
