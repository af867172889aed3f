"""The DreamBooth paper's numbers (Ruiz et al., CVPR 2023, arXiv 2208.12242), as shared/docs/PROTOCOL.md pins
them, and how our rows map onto the paper's. Raw cosine similarities (0.668, not 66.8)."""

from __future__ import annotations

from dataclasses import dataclass, field

METRICS = ("dino", "clip_i", "clip_t", "pres", "div")
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV",
          "dino_minus_pres": "DINO − PRES"}
LOWER_IS_BETTER = {"pres"}


@dataclass(frozen=True)
class Row:
    key: str  # recipe.row of our runs ("real" for the real-images row)
    label: str
    paper: dict[str, float | None]  # None: the paper gives no number (n/a)
    paper_label: str = ""  # the paper's row we compare with, where its wording differs
    # Left out of the table when no run has this row (the LoRA row: only the families with a LoRA recipe run it).
    optional: bool = False


# `{model}` in a row's label: the model its runs trained (model=...), by this name; the paper's wording
# ("Stable Diffusion") where the runs do not say (runs from before the model families).
MODEL_LABELS = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL", "sd35": "SD 3.5 medium",
                "sd35_large": "SD 3.5 large", "flux": "FLUX.1-dev", "flux_schnell": "FLUX.1-schnell",
                "toy": "toy model", "tiny": "tiny model", "tiny_sdxl": "tiny SDXL", "tiny_sd3": "tiny SD 3.5",
                "tiny_flux": "tiny FLUX.1"}


def model_label(names: set[str]) -> str:
    """'SDXL' for runs of model=sdxl; several models (a folder that mixes them) joined with ' / '."""
    return " / ".join(MODEL_LABELS.get(n, n) for n in sorted(names)) or "Stable Diffusion"


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    metrics: tuple[str, ...]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = field(default=())  # what is known to differ from the paper
    # Orderings the paper implies but its table has no numbers for: (higher row, lower row, metrics). Checked like
    # the table's own orderings (analysis.tables.directions), with no paper difference beside them.
    orders: tuple[tuple[str, str, tuple[str, ...]], ...] = field(default=())
    # A table of effects (not the paper's): every other row minus this one, per metric, instead of the paper's
    # orderings, with the verdict "raises" / "lowers" / "not resolved" (experiments/toolbox.sh).
    baseline: str | None = None
    # "subject": several seeds of a subject are averaged first, and intervals are over subjects (the paper's
    # tables); "run": every (subject, seed) run is a unit of its own, paired by subject and seed.
    unit: str = "subject"


SD_NOTES = (
    "Stable Diffusion version: the paper does not say which; ours is model.pretrained (SD 1.5 by default).",
    "Sampler, steps and guidance scale: not given in the paper; ours are the run's guidance.* (DDIM, 50 steps, "
    "7.5 by default), recorded in each eval/metrics.json.",
    ("Class images: the paper used ~1000 generated prior images (and says fewer work); conf/prior/generated.yaml "
     "generates 200 by default, the toy world's recipes 16: each row's number is in the Training note."),
)

TABLES = {
    "table1": Table(
        "table1",
        "Table 1: subject fidelity (DINO, CLIP-I) and prompt fidelity (CLIP-T)",
        ("dino", "clip_i", "clip_t"),
        (
            Row("real", "Real images", {"dino": 0.774, "clip_i": 0.885, "clip_t": None}),
            Row(
                "dreambooth",
                "DreamBooth ({model})",
                {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
                paper_label="DreamBooth (Stable Diffusion)",
            ),
            Row(
                "textual_inversion",
                "Textual Inversion ({model})",
                {"dino": 0.569, "clip_i": 0.780, "clip_t": 0.255},
                paper_label="Textual Inversion (Stable Diffusion)",
            ),
            # Not a row of the paper's table: DreamBooth-LoRA with the settings the family's peers publish
            # (conf/recipe/lora_{sdxl,sd35,flux}.yaml), what most people train on SDXL, SD 3.5 and FLUX.1 today.
            Row("lora", "DreamBooth-LoRA ({model}, not in the paper)", {"dino": None, "clip_i": None, "clip_t": None},
                optional=True),
            # Not a row of the paper's table: the base model as it is, sampled with the same prompts. Both methods
            # must rise above it in subject fidelity, or they learnt nothing (conf/recipe/table1_untrained.yaml).
            Row("untrained", "Untrained model (not in the paper)", {"dino": None, "clip_i": None, "clip_t": None}),
        ),
        SD_NOTES
        + (
            "DreamBooth (Imagen), 0.696 / 0.812 / 0.306 in the paper, is not reproducible here (Imagen is not "
            "public).",
            "Textual Inversion: the paper does not give its TI settings; ours are Gal et al.'s (lr 5e-3 x batch, "
            "no prior loss), conf/recipe/table1_textual_inversion.yaml (3000 steps; the toy world's recipe 300: "
            "each row's steps and learning rate are in the Training note).",
            "Real-images row: near-duplicate photos (cat 01/02, dog 03/04, dog5 02/03) inflate it, as in the paper.",
            ("Untrained model: not in the paper's table; the base model with no training step, the floor both methods "
             "must rise above in subject fidelity (DINO, CLIP-I)."),
            ("DreamBooth-LoRA (SDXL, SD 3.5, FLUX.1 only): not in the paper; the family's peers' published LoRA "
             "settings, conf/recipe/lora_*.yaml, each file citing its sources."),
        ),
        orders=(("dreambooth", "untrained", ("dino", "clip_i")),
                ("textual_inversion", "untrained", ("dino", "clip_i")),
                ("lora", "untrained", ("dino", "clip_i"))),
    ),
    "table3": Table(
        "table3",
        "Table 3: prior-preservation loss ablation",
        # DINO − PRES (analysis.tables.DERIVED): how much more the subject's prompts draw the subject than the bare
        # class prompt does, per run. The paper's "less drift at similar fidelity" as one number: a trainer that cuts
        # drift only by learning the subject less (a broken prior) lowers PRES but not this (docs/TOY_WORLD.md).
        ("pres", "div", "dino", "clip_i", "clip_t", "dino_minus_pres"),
        (
            Row(
                "with_prior",
                "With prior loss (λ = 1)",
                {"pres": 0.493, "div": 0.391, "dino": 0.684, "clip_i": 0.815, "clip_t": 0.308,
                 "dino_minus_pres": round(0.684 - 0.493, 3)},
            ),
            Row(
                "no_prior",
                "Without prior loss (λ = 0)",
                {"pres": 0.664, "div": 0.371, "dino": 0.712, "clip_i": 0.828, "clip_t": 0.306,
                 "dino_minus_pres": round(0.712 - 0.664, 3)},
            ),
        ),
        (
            "The paper's Table 3 was run on Imagen with 15 unnamed subjects; ours is Stable Diffusion on the recipe's "
            "subjects: compare the direction and size of the effect (PRES up, DIV down without the prior), not the "
            "values.",
            "DINO − PRES is not a column of the paper's: it is computed from the paper's DINO and PRES (0.684 − 0.493 "
            "and 0.712 − 0.664) and, for ours, per run from the same two numbers.",
        )
        + SD_NOTES,
    ),
    "table4": Table(
        "table4",
        "Table 4: class-noun ablation",
        ("dino", "clip_i"),
        (
            Row("correct", "Correct class noun", {"dino": 0.744, "clip_i": 0.853}),
            Row("none", "No class noun", {"dino": 0.303, "clip_i": 0.607}),
            Row("wrong", "Wrong class noun", {"dino": 0.454, "clip_i": 0.728}),
        ),
        (
            "The paper's Table 4 was run on Imagen with 5 subjects; ours is Stable Diffusion on the recipe's subjects: "
            "compare the ordering (correct > wrong > none), not the values.",
            "Wrong class: another DreamBench class drawn per subject with a fixed seed (analysis/recipes.py); the "
            "paper does not say how its wrong classes were chosen.",
            "No class noun: the class prompt of the prior loss becomes 'a' (the paper does not say what it used).",
        )
        + SD_NOTES,
    ),
    "toolbox": Table(
        "toolbox",
        "The training toolbox: each switch's effect on DreamBooth (not in the paper)",
        ("dino", "clip_i", "clip_t", "pres"),
        tuple(
            Row(key, label, {"dino": None, "clip_i": None, "clip_t": None, "pres": None})
            for key, label in (
                ("baseline", "DreamBooth, every switch off"),
                ("min_snr", "min-SNR-γ, γ = 5"),
                ("noise_offset", "offset noise 0.05"),
                ("input_perturbation", "input perturbation 0.1"),
                ("ema", "EMA of the weights"),
                ("caption_dropout", "caption dropout 0.1"),
                ("mask", "masked loss"),
            )
        ),
        (
            "Not a table of the paper: each switch of docs/TOOLBOX.md against DreamBooth with every switch off, same "
            "subjects, seeds, steps and learning rate; recipes conf/recipe/toolbox_*.yaml.",
            "Δ: switch − baseline per (subject, seed) run, paired; PRES is lower-is-better (a switch that lowers it "
            "preserves the class better).",
            "Masked loss needs masks: the toy world writes each photo's silhouette; DreamBench's photos have none (the "
            "row then trains as the baseline).",
        ),
        baseline="baseline",
        unit="run",
    ),
}
