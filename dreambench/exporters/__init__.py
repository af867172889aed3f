"""Exports of a run for other tools: formats (`formats.py`) and, per model family, the key mapping to the
family's original checkpoint layout (one module each: `sd.py` for SD 1.x/2.x; SDXL, SD3 and Flux add theirs and
one line in FAMILIES)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from dreambench.errors import UserError
from dreambench.exporters import sd
from dreambench.exporters.formats import EXPORT_DIR, FORMATS, Format, run_facts

FAMILIES: tuple[ModuleType, ...] = (sd,)


def family_of(pipe: Any) -> ModuleType:
    name = type(pipe).__name__
    for fam in FAMILIES:
        if name in fam.PIPELINES:
            return fam
    raise UserError(f"no single-file layout for {name} yet (known: "
                    f"{', '.join(p for f in FAMILIES for p in f.PIPELINES)})")


# The model families (dreambench.models.families) whose original checkpoint layouts the formats beyond `diffusers`
# know; an SDXL run exports `model/` (diffusers) only, for now.
LAYOUT_FAMILIES = ("sd",)


def choose_formats(requested: str | list[str] | tuple[str, ...], method: str, family: str = "sd") -> list[Format]:
    """The formats asked for, checked against the run's method and model family before anything loads. `all`:
    every format that applies to the method (and the family)."""
    names = [requested] if isinstance(requested, str) else list(requested)
    if names == ["all"]:
        return [f for f in FORMATS.values() if f.applies(method) and (family in LAYOUT_FAMILIES or f.name == "diffusers")]
    other = [n for n in names if n != "diffusers" and n in FORMATS]
    if family not in LAYOUT_FAMILIES and other:
        raise UserError(f"format={','.join(other)}: no {family} layout yet; a model.family={family} run exports "
                        f"the diffusers format (model/), which diffusers' own pipeline and ComfyUI's diffusers "
                        f"loader read")
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise UserError(f"unknown export format(s) {', '.join(map(repr, unknown))} "
                        f"(known: {', '.join(FORMATS)}, or all)")
    wrong = [n for n in names if not FORMATS[n].applies(method)]
    if wrong:
        raise UserError("; ".join(f"format={n} does not apply to a {method} run (it applies to "
                                  f"{', '.join(FORMATS[n].methods)})" for n in wrong))
    return [FORMATS[n] for n in dict.fromkeys(names)]


def check_run(run: Path) -> None:
    if not (run / "model").is_dir():
        raise UserError(f"run={run}: no model/ folder there (a finished run with train.export_model=true)")


def export_run(run: str | Path, requested: str | list[str] = "all") -> dict[str, list[Path]]:
    """Write the requested exports of a finished run; returns {format: files}."""
    run = Path(run).expanduser()
    check_run(run)
    facts = run_facts(run)
    return {f.name: f.export(run, facts) for f in choose_formats(requested, facts["method"], facts["family"])}


__all__ = ["EXPORT_DIR", "FAMILIES", "FORMATS", "choose_formats", "export_run", "family_of", "run_facts"]
