"""Model families (docs/FAMILIES.md): `model.family` picks one; see base.Family for what differs between them."""

from __future__ import annotations

import json
from pathlib import Path

from dreambench.models.families.base import Cond, Family, cond_cat, cond_float, cond_take, cond_where
from dreambench.models.families.flux import Flux
from dreambench.models.families.sd import SD
from dreambench.models.families.sd3 import SD3
from dreambench.models.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD(), SDXL(), SD3(), Flux())}
# model_index.json's _class_name -> family (a folder says what it is; a mismatch with model.family is an error).
BY_PIPELINE = {f.pipeline_class: f.name for f in FAMILIES.values()}


def get_family(name: str | None) -> Family:
    fam = FAMILIES.get(str(name or "sd"))
    if fam is None:
        from dreambench.errors import UserError
        raise UserError(f"model.family={name!r} is not a model family (known: {', '.join(FAMILIES)})")
    return fam


def folder_family(folder: str | Path) -> str | None:
    """The family of a local diffusers folder, from its model_index.json (None when it has none or another
    pipeline class)."""
    f = Path(folder).expanduser() / "model_index.json"
    if not f.is_file():
        return None
    return BY_PIPELINE.get(json.loads(f.read_text()).get("_class_name"))


__all__ = ["BY_PIPELINE", "FAMILIES", "Cond", "Family", "cond_cat", "cond_float", "cond_take", "cond_where",
           "folder_family", "get_family"]
