"""What the table recipes (experiments/table*.sh) ask of the data set, as one-line answers for shell scripts.

python -m analysis.recipes subjects [--smoke]        dog,backpack,...  (all 30; --smoke: dog,backpack)
python -m analysis.recipes wrong-class dog [--seed 0]  a DreamBench class other than the subject's
python -m analysis.recipes has-method textual_inversion [overrides...]   yes / no: the composed model's family has it
python -m analysis.recipes lora-recipe [overrides...]   lora_sdxl / lora_sd35 / lora_flux: the composed model's
                                                        family's DreamBooth-LoRA recipe (nothing: it has none)
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from dreambench.data import dreambench as db

SMOKE_SUBJECTS = ("dog", "backpack")  # one live subject, one object: both prompt lists are exercised


def subjects(smoke: bool = False) -> list[str]:
    if smoke:
        return list(SMOKE_SUBJECTS)
    return list(db.load_index(db.resolve_root(download=False)).classes)


def wrong_class(subject: str, seed: int = 0) -> str:
    # Table 4's "wrong class noun": another DreamBench class, drawn per subject from a fixed seed, so the ablation
    # is the same on every machine ("a sks can" for the backpack, ...).
    classes = db.load_index(db.resolve_root(download=False)).classes
    if subject not in classes:
        raise SystemExit(f"analysis.recipes: error: {subject!r} is not a DreamBench subject")
    others = sorted(set(classes.values()) - {classes[subject]})
    return random.Random(f"table4-wrong:{seed}:{subject}").choice(others)


CONF = Path(__file__).resolve().parents[1] / "conf"


def _family(overrides: list[str]) -> str:
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=dog", *overrides])
    return str(cfg.model.get("family") or "sd")


def has_method(method: str, overrides: list[str]) -> bool:
    """Whether the model family of the train config composed with `overrides` has `method` (e.g. Table 1's Textual
    Inversion row on SD 3.5 / Flux: it does not)."""
    from dreambench.models.families import get_family
    return method in get_family(_family(overrides)).methods


def lora_recipe(overrides: list[str]) -> str | None:
    """The conf/recipe/lora_*.yaml whose model (its `override /model`) is of the composed model's family: Table 1's
    DreamBooth-LoRA row for that family, trained with the composed model (model=tiny_sdxl still gets lora_sdxl's
    settings); None where there is none (SD 1.x / 2.x)."""
    import yaml
    family = _family(overrides)
    for path in sorted((CONF / "recipe").glob("lora_*.yaml")):
        defaults = yaml.safe_load(path.read_text()).get("defaults") or []
        model = next((d["override /model"] for d in defaults if isinstance(d, dict) and "override /model" in d), None)
        if model and (yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text()) or {}).get("family") == family:
            return path.stem
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m analysis.recipes")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("subjects")
    s.add_argument("--smoke", action="store_true")
    w = sub.add_parser("wrong-class")
    w.add_argument("subject")
    w.add_argument("--seed", type=int, default=0)
    h = sub.add_parser("has-method")
    h.add_argument("method")
    h.add_argument("overrides", nargs="*")
    lo = sub.add_parser("lora-recipe")
    lo.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.cmd == "has-method":
        print("yes" if has_method(a.method, a.overrides) else "no")
        return
    if a.cmd == "lora-recipe":
        print(lora_recipe(a.overrides) or "")
        return
    try:
        print(",".join(subjects(a.smoke)) if a.cmd == "subjects" else wrong_class(a.subject, a.seed))
    except db.DatasetNotFoundError as e:
        raise SystemExit(f"analysis.recipes: error: {e}") from None


if __name__ == "__main__":
    main()
