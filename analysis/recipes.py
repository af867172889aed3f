"""What the table recipes (experiments/table*.sh) ask of the data set, as one-line answers for shell scripts.

python -m analysis.recipes subjects [--smoke]        dog,backpack,...  (all 30; --smoke: dog,backpack)
python -m analysis.recipes wrong-class dog [--seed 0]  a DreamBench class other than the subject's
python -m analysis.recipes has-method textual_inversion [overrides...]   yes / no: the composed model's family has it
"""

from __future__ import annotations

import argparse
import random

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


def has_method(method: str, overrides: list[str]) -> bool:
    """Whether the model family of the train config composed with `overrides` has `method` (e.g. Table 1's Textual
    Inversion row on SD 3.5 / Flux: it does not)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from dreambench.models.families import get_family
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=dog", *overrides])
    return method in get_family(cfg.model.get("family")).methods


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
    a = p.parse_args(argv)
    if a.cmd == "has-method":
        print("yes" if has_method(a.method, a.overrides) else "no")
        return
    try:
        print(",".join(subjects(a.smoke)) if a.cmd == "subjects" else wrong_class(a.subject, a.seed))
    except db.DatasetNotFoundError as e:
        raise SystemExit(f"analysis.recipes: error: {e}") from None


if __name__ == "__main__":
    main()
