"""`python -m analysis.tables <folder> [--table table1|table3|table4] [--out DIR]`: the paper's tables from run
folders, ours beside the paper's.

Reads only what the recipes (experiments/table*.sh) leave on disk: every run folder under <folder> (its
config.yaml says `recipe.table`, `recipe.row`, `data.subject`, `seed`, and in `recipe.also` any other
<table>/<row> the same training stands for; its eval/metrics.json the per-subject
scores of `python -m dreambench.evaluate`) and, for Table 1's "Real images" row, <folder>/real/eval/metrics.json.
A row's number is the unweighted mean over subjects (a subject with several seeds: their mean first) with a 95%
percentile bootstrap interval over subjects (1000 resamples, seed 0: the evaluation's own procedure). Writes to
<folder>/tables/ (or --out), per table:

    <table>.md  <table>.tex  <table>.csv   ours [95% CI], the paper's, ours - paper, subjects
    <table>_directions.csv                 every ordering of two rows the paper's table states, checked as a
                                           paired per-subject difference with its interval: holds / reversed /
                                           not resolved (also in <table>.md and report.html)
    <table>_bars.png                       bars with intervals per row and metric, the paper's as markers
    <table>_scatter.png                    per-subject DINO vs CLIP-T (CLIP-I where a table has no CLIP-T)
    report.html                            all tables, image grids per subject and row, protocol, differences
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from analysis.paper import LABELS, TABLES, Table, model_label

BOOT = {"samples": 1000, "seed": 0, "level": 0.95}


@dataclass
class Run:
    folder: Path
    table: str
    row: str
    subject: str
    seed: int
    scores: dict[str, float]  # this run's subject's eval numbers; absent: not evaluated / not computable
    reasons: dict[str, str]  # metric -> why there is no number ("unavailable: ...")
    protocol: dict | None
    model: str = ""  # model.name (sd15, sdxl, ...; empty in runs that do not say)
    training: str | None = None  # how it was trained, from its config.yaml (_training); None: the config does not say


@dataclass
class Cell:
    mean: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    n: int = 0
    reason: str = ""


@dataclass
class RowResult:
    key: str
    label: str
    cells: dict[str, Cell]
    paper: dict[str, float | None]
    per_subject: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)


def _load_yaml(path: Path) -> dict:
    # config.yaml of a run is already resolved: plain data, no interpolation left.
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


# Scores made of two others, per run: name -> (a, b) for a - b.
DERIVED = {"dino_minus_pres": ("dino", "pres")}


def _scores(eval_json: dict, subject: str) -> tuple[dict[str, float], dict[str, str]]:
    scores, reasons = {}, {}
    for name, value in eval_json.get("metrics", {}).items():
        if isinstance(value, dict):
            v = value.get("per_subject", {}).get(subject)
            if v is not None and math.isfinite(v):
                scores[name] = float(v)
        else:
            reasons[name] = str(value)
    for name, (a, b) in DERIVED.items():
        if a in scores and b in scores:
            scores[name] = scores[a] - scores[b]
        elif reasons.get(a) or reasons.get(b):
            reasons[name] = reasons.get(a) or reasons.get(b)
    return scores, reasons


def find_runs(folder: Path) -> list[Run]:
    runs = []
    for cfg_file in sorted(folder.rglob("config.yaml")):
        inside = cfg_file.parts[len(folder.parts) :]
        # <run>/.hydra/config.yaml is Hydra's record of the same run, not a run of its own
        if "eval" in inside or any(part.startswith(".") for part in inside):
            continue
        cfg = _load_yaml(cfg_file)
        recipe = cfg.get("recipe") or {}
        if not recipe.get("table"):
            continue  # a run that no table recipe made
        run = cfg_file.parent
        subject = str(cfg["data"]["subject"])
        ev_file = run / "eval" / "metrics.json"
        ev = json.loads(ev_file.read_text()) if ev_file.is_file() else {}
        scores, reasons = _scores(ev, subject)
        if not ev:
            reasons = {"*": "not evaluated (no eval/metrics.json)"}
        # recipe.also: the same training counted as a row of other tables (conf/recipe/tables_dreambooth.yaml)
        for table_row in [f"{recipe['table']}/{recipe['row']}", *(recipe.get("also") or [])]:
            table, sep, row = str(table_row).partition("/")
            if not (sep and table and row):
                raise SystemExit(
                    f"analysis.tables: error: {cfg_file}: recipe.also entry {table_row!r} is not <table>/<row>"
                )
            runs.append(
                Run(
                    run,
                    table,
                    row,
                    subject,
                    int(cfg.get("seed", 0)),
                    scores,
                    reasons,
                    ev.get("protocol"),
                    str((cfg.get("model") or {}).get("name") or ""),
                    _training(cfg),
                )
            )
    return runs


def real_row(
    folder: Path, table: str = "table1"
) -> tuple[dict[str, dict[str, float]], dict[str, str], dict | None]:
    # <table folder>/real (the recipe's), or <folder>/<table>/real when given the parent of several tables, or
    # dreambench.evaluate's own default out_dir (experiments/real-images).
    candidates = [folder / "real", folder / table / "real", folder / "real-images"]
    f = next(
        (c / "eval" / "metrics.json" for c in candidates if (c / "eval" / "metrics.json").is_file()), None
    )
    if f is None:
        return {}, {"*": f"no real-images evaluation ({candidates[0]}/eval/metrics.json missing)"}, None
    ev = json.loads(f.read_text())
    per = {s: {k: float(v) for k, v in d.items()} for s, d in ev.get("per_subject", {}).items()}
    reasons = {k: str(v) for k, v in ev.get("metrics", {}).items() if not isinstance(v, dict)}
    return per, reasons, ev.get("protocol")


def aggregate(per_subject: dict[str, dict[str, float]], metric: str, reason: str = "") -> Cell:
    from dreambench.metrics.functional import bootstrap_ci

    vals = [d[metric] for d in per_subject.values() if metric in d]
    if not vals:
        return Cell(reason=reason or "no data")
    lo, hi = bootstrap_ci(vals, BOOT["samples"], BOOT["seed"], BOOT["level"])
    return Cell(sum(vals) / len(vals), lo, hi, len(vals))


@dataclass
class Direction:
    """An ordering of two rows on one metric, checked on our subjects: the per-subject difference `higher - lower`
    (the rows as the paper orders them), its mean and 95% bootstrap interval over the subjects both rows have.
    paper_diff is None for an ordering the paper implies but gives no numbers for (Table.orders)."""
    higher: str
    lower: str
    metric: str
    paper_diff: float | None
    diff: Cell
    effect: bool = False  # `higher` is a switch, `lower` the baseline (Table.baseline): raises / lowers

    @property
    def verdict(self) -> str:
        if not self.diff.n:
            return "no data"
        if self.diff.lo > 0:
            return "raises" if self.effect else "holds"
        if self.diff.hi < 0:
            return "lowers" if self.effect else "reversed"
        return "not resolved"


def paired(hi: RowResult, lo: RowResult, m: str) -> Cell:
    """The mean per-subject difference hi - lo on metric m with its bootstrap interval, over the subjects both
    rows have a number for."""
    from dreambench.metrics.functional import bootstrap_ci

    both = [s for s in hi.per_subject if m in hi.per_subject[s] and m in lo.per_subject.get(s, {})]
    d = [hi.per_subject[s][m] - lo.per_subject[s][m] for s in both]
    if not d:
        return Cell(reason="no subject in both rows")
    return Cell(sum(d) / len(d), *bootstrap_ci(d, BOOT["samples"], BOOT["seed"], BOOT["level"]), len(d))


def directions(table: Table, rows: list[RowResult]) -> list[Direction]:
    """Every ordering the paper's table states (two rows, a metric both have a number for), then the ones it
    implies (table.orders), as paired differences over subjects: what "DreamBooth beats Textual Inversion" means,
    with its interval. A table with a baseline (Table.baseline): every other row minus the baseline instead."""
    by_key = {r.key: r for r in rows}
    if table.baseline:
        base = by_key[table.baseline]
        return [Direction(r.key, base.key, m, None, paired(r, base, m), effect=True)
                for r in rows if r.key != base.key for m in table.metrics]
    out = []
    for m in table.metrics:
        with_paper = [r for r in rows if r.paper.get(m) is not None]
        for i, a in enumerate(with_paper):
            for b in with_paper[i + 1:]:
                hi, lo = (a, b) if a.paper[m] >= b.paper[m] else (b, a)
                out.append(Direction(hi.key, lo.key, m, hi.paper[m] - lo.paper[m], paired(hi, lo, m)))
    for hi_key, lo_key, metrics in table.orders:
        if hi_key in by_key and lo_key in by_key:
            out += [Direction(hi_key, lo_key, m, None, paired(by_key[hi_key], by_key[lo_key], m)) for m in metrics]
    return out


def paper_diff(d: Direction) -> str:
    return "n/a" if d.paper_diff is None else f"{d.paper_diff:+.3f}"


def direction_head(table: Table) -> tuple[str, ...]:
    """The columns of a table's directions (markdown and report.html); a baseline table has effects instead."""
    if table.baseline:
        return ("switch", "metric", "Δ switch − baseline [95% CI]", "n", "effect")
    return ("higher in the paper", "lower", "metric", "paper Δ", "ours Δ [95% CI]", "n", "verdict")


def direction_cells(table: Table, d: Direction, labels: dict[str, str]) -> tuple[str, ...]:
    """One direction's cells under direction_head(table)."""
    if table.baseline:
        return (labels[d.higher], LABELS[d.metric], signed(d.diff), str(d.diff.n), d.verdict)
    return (labels[d.higher], labels[d.lower], LABELS[d.metric], paper_diff(d), signed(d.diff), str(d.diff.n),
            d.verdict)


def build(folder: Path, table: Table) -> list[RowResult]:
    runs = [r for r in find_runs(folder) if r.table == table.name]
    subjects = sorted({r.subject for r in runs})
    out = []
    for row in table.rows:
        if row.key == "real":
            per, reasons, _ = real_row(folder, table.name)
            per = {s: v for s, v in per.items() if not subjects or s in subjects}
            mine: list[Run] = []
        else:
            mine = [r for r in runs if r.row == row.key]
            if row.optional and not mine:
                continue
            per = {}
            if table.unit == "run":  # each (subject, seed) a unit: rows pair by subject and seed
                per = {f"{r.subject}-s{r.seed}": dict(r.scores) for r in mine}
            else:
                for s in sorted({r.subject for r in mine}):  # several seeds of a subject: their mean first
                    seeds = [r.scores for r in mine if r.subject == s]
                    keys = set().union(*seeds)
                    per[s] = {k: sum(x[k] for x in seeds if k in x) / sum(k in x for x in seeds) for k in keys}
            reasons = {}
            for r in mine:
                reasons.update(r.reasons)
            if not mine:
                reasons = {"*": "no runs"}
        cells = {m: aggregate(per, m, reasons.get(m) or reasons.get("*", "")) for m in table.metrics}
        if row.key == "real":  # CLIP-T has no meaning for real images (no prompt)
            cells = {
                m: (Cell(reason="n/a") if row.paper.get(m) is None and not c.n else c)
                for m, c in cells.items()
            }
        label = row.label.format(model=model_label({r.model for r in mine if r.model})) if "{model}" in row.label \
            else row.label
        out.append(RowResult(row.key, label, cells, row.paper, per, mine))
    return out


def smoke_note(rows: list[RowResult]) -> str | None:
    """A warning when the numbers come from the tiny model or tiny encoders (smoke runs): they check the
    pipeline end to end, not the paper. Toy-world runs (model=toy) get a note of their own: their directions
    can be compared with the paper's, their values cannot."""
    toy = False
    for r in rows:
        for run in r.runs:
            cfg = _load_yaml(run.folder / "config.yaml")
            enc = json.dumps((run.protocol or {}).get("encoders", {}))
            if (cfg.get("model") or {}).get("build_tiny") or "tiny-encoders" in enc:
                return (
                    "SMOKE RUN: tiny random model and/or tiny random encoders — these numbers test the "
                    "pipeline end to end and mean nothing about the paper."
                )
            toy = toy or (cfg.get("model") or {}).get("name") == "toy"
    if toy:
        return ("TOY WORLD: model=toy and metrics=toy (docs/TOY_WORLD.md), a world small enough for a CPU — compare "
                "each direction with the paper's, not the values.")
    return None


def _generation(protocol: dict | None) -> str | None:
    g = (protocol or {}).get("generation")
    if not g:
        return None  # real images, or an evaluation of a folder made elsewhere
    gd = g.get("guidance") or {}
    size = f", {gd['height']} px" if gd.get("height") else ""
    return (f"{gd.get('scheduler', '?')}, {gd.get('num_inference_steps', '?')} steps, guidance "
            f"{gd.get('guidance_scale', '?')}{size}, {g.get('images_per_prompt', '?')} images x "
            f"{g.get('n_prompts', '?')} prompts")


def _training(cfg: dict) -> str | None:
    """A run's training as the tables' notes state it, from its config.yaml: steps, learning rate (the method's
    own where it has one, e.g. Textual Inversion's, else the optimizer's), batch, the text encoder if trained, and
    the prior loss."""
    trainer = cfg.get("trainer") or {}
    if "max_steps" not in trainer:
        return None  # not a config train() wrote
    steps = int(trainer["max_steps"])
    if steps == 0:
        return "no training step"
    lr = (cfg.get("method") or {}).get("lr") or (cfg.get("optimizer") or {}).get("lr")
    batch = (cfg.get("data") or {}).get("batch_size")
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    prior = cfg.get("prior") or {}
    weight = float(prior.get("weight") or 0)
    parts = [f"{steps} steps"]
    if lr is not None:
        parts.append(f"lr {float(lr):g}")
    if batch is not None:
        parts.append(f"batch {batch}" + (f" x {accumulate} accumulated" if accumulate > 1 else ""))
    model = cfg.get("model") or {}
    if model.get("train_text_encoder"):
        te_lr = model.get("text_encoder_lr")
        parts.append("text encoder trained" + (f" (lr {float(te_lr):g})" if te_lr is not None else ""))
    if weight > 0:
        source = "generated" if str(prior.get("_target_", "")).endswith("GeneratedPrior") else "folder"
        n = prior.get("num_images")
        parts.append(f"prior loss λ {weight:g} on {n if n else 'all'} {source} class images")
    else:
        parts.append("no prior loss")
    return ", ".join(parts)


def training_note(rows: list[RowResult]) -> tuple[str | None, str | None]:
    """(warning, note) on how each row was trained, read from its runs' config.yaml: the paper's steps, learning
    rates and number of class images are not what a CPU recipe runs (the toy world trains 300 steps on 16 class
    images), so the table says what its runs did. A row whose runs were trained differently (beyond seed and
    subject): the warning, as its mean mixes settings. Neither when no run's config says."""
    per_row: dict[str, dict[str, int]] = {}
    for r in rows:
        for run in r.runs:
            if run.training is not None:
                counts = per_row.setdefault(r.label, {})
                counts[run.training] = counts.get(run.training, 0) + 1
    if not per_row:
        return None, None
    mixed = {label: c for label, c in per_row.items() if len(c) > 1}
    if mixed:
        parts = "; ".join(f"{label}: " + " / ".join(f"{t} ({n} run{'s' * (n != 1)})" for t, n in c.items())
                          for label, c in mixed.items())
        return f"MIXED TRAINING SETTINGS within a row — its mean mixes runs trained differently: {parts}.", None
    return None, "Training (each run's config.yaml): " + "; ".join(
        f"{label}: {next(iter(c))}" for label, c in per_row.items()) + "."


def generation_note(rows: list[RowResult]) -> tuple[str | None, str | None]:
    """(warning, note) on how the table's images were generated, read from the runs' eval/metrics.json (the
    sampler, steps and guidance are not the paper's, which does not give them). One setting for every run: the
    note. Runs evaluated with different settings: the warning, row by row, as their numbers are not comparable
    (e.g. 25 DDIM steps against 50 moves every score of a toy table by ~0.01). Neither when no run generated."""
    settings: dict[str, list[str]] = {}
    for r in rows:
        for run in r.runs:
            if (g := _generation(run.protocol)) is not None:
                settings.setdefault(g, []).append(r.key)
    if not settings:
        return None, None
    if len(settings) == 1:
        return None, f"Generation (every run's eval/metrics.json): {next(iter(settings))}."
    parts = "; ".join(f"{g} ({len(v)} run{'s' * (len(v) != 1)}: {', '.join(sorted(set(v)))})"
                      for g, v in settings.items())
    return f"MIXED GENERATION SETTINGS — runs evaluated differently are not comparable: {parts}.", None


def settings_notes(rows: list[RowResult]) -> tuple[list[str], list[str]]:
    """What a table says about its own runs, for the markdown and report.html alike: (warnings, notes). Warnings:
    smoke or toy numbers, mixed generation or training settings; notes: the generation and training settings."""
    gen_warn, gen_note = generation_note(rows)
    train_warn, train_note = training_note(rows)
    return ([w for w in (smoke_note(rows), gen_warn, train_warn) if w],
            [n for n in (gen_note, train_note) if n])


# ------------------------------------------------------------------------------------------------- rendering


def fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def ours(c: Cell) -> str:
    return f"{fmt(c.mean)} [{fmt(c.lo)}, {fmt(c.hi)}]" if c.n else (c.reason or "n/a")


def signed(c: Cell) -> str:
    """A difference with its interval, signs shown (the directions); the reason when there is none."""
    return f"{c.mean:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}]" if c.n else (c.reason or "n/a")


def diff(c: Cell, paper: float | None) -> float | None:
    return c.mean - paper if c.n and paper is not None else None


def to_markdown(table: Table, rows: list[RowResult]) -> str:
    paper = not table.baseline  # a table of effects has no paper numbers beside its own
    cols = ("ours [95% CI]", "paper", "Δ") if paper else ("ours [95% CI]",)
    head = ["row"] + [f"{LABELS[m]} {h}" for m in table.metrics for h in cols] + ["n"]
    lines = [f"### {table.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for m in table.metrics:
            c, p = r.cells[m], r.paper.get(m)
            d = diff(c, p)
            cells += [ours(c), fmt(p), "n/a" if d is None else f"{d:+.3f}"] if paper else [ours(c)]
        n = max((c.n for c in r.cells.values()), default=0)
        lines.append("| " + " | ".join([r.label] + cells + [str(n)]) + " |")
    labels = {r.key: r.label for r in rows}
    head = direction_head(table)
    lines += ["", ("Effects: each switch minus the baseline, the mean of the paired per-run differences (same "
                   "subject and seed) [95% bootstrap interval over runs]; a switch raises or lowers a metric when "
                   "the interval excludes 0.") if table.baseline else
              ("Directions: the paper's ordering of two rows, as the mean per-subject difference (higher − lower "
               "in the paper) [95% bootstrap interval over subjects]; it holds when the interval excludes 0. "
               "Paper Δ n/a: an ordering the paper implies but has no numbers for."), "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in directions(table, rows):
        lines.append("| " + " | ".join(direction_cells(table, d, labels)) + " |")
    warnings, notes = settings_notes(rows)
    lines += (
        [line for w in warnings for line in ("", f"**{w}**")]
        + [
            "",
            f"Ours: mean over {'runs' if table.unit == 'run' else 'subjects'} [95% bootstrap interval over "
            f"{'runs' if table.unit == 'run' else 'subjects'}]"
            + ("; Δ = ours − paper. Known differences from the paper:" if paper else ". Notes:"),
            "",
        ]
        + [f"- {n}" for n in (*table.notes, *notes)]
    )
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    return (
        s.replace("\\", r"\textbackslash{}")
        .replace("&", r"\&")
        .replace("%", r"\%")
        .replace("_", r"\_")
        .replace("#", r"\#")
        .replace("λ", r"$\lambda$")
    )


def to_latex(table: Table, rows: list[RowResult]) -> str:
    m = table.metrics
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\begin{tabular}{l" + "ccc" * len(m) + "}",
        r"\toprule",
        " & " + " & ".join(rf"\multicolumn{{3}}{{c}}{{{LABELS[x]}}}" for x in m) + r" \\",
        " & ".join(["Method"] + ["ours", "paper", r"$\Delta$"] * len(m)) + r" \\",
        r"\midrule",
    ]
    for r in rows:
        cells = []
        for x in m:
            c, p = r.cells[x], r.paper.get(x)
            d = diff(c, p)
            cells += [
                rf"{c.mean:.3f} \tiny{{[{c.lo:.3f}, {c.hi:.3f}]}}" if c.n else "--",
                fmt(p) if p is not None else "--",
                f"{d:+.3f}" if d is not None else "--",
            ]
        lines.append(" & ".join([_tex(r.label)] + cells) + r" \\")
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        rf"\caption{{{_tex(table.title)}. Ours: mean over subjects with a 95\% bootstrap interval; "
        r"paper: Ruiz et al.\ (CVPR 2023).}",
        rf"\label{{tab:{table.name}}}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def directions_csv(table: Table, rows: list[RowResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "higher", "lower", "metric", "paper_diff", "diff", "ci95_lo", "ci95_hi", "n_subjects",
                "verdict"])
    for d in directions(table, rows):
        c = d.diff
        w.writerow([table.name, d.higher, d.lower, d.metric, "" if d.paper_diff is None else f"{d.paper_diff:.4f}",
                    *([f"{c.mean:.4f}", f"{c.lo:.4f}", f"{c.hi:.4f}"] if c.n else ["", "", ""]), c.n, d.verdict])
    return buf.getvalue()


def to_csv(table: Table, rows: list[RowResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "table",
            "row",
            "label",
            "metric",
            "ours",
            "ci95_lo",
            "ci95_hi",
            "n_subjects",
            "paper",
            "diff",
            "note",
        ]
    )
    for r in rows:
        for m in table.metrics:
            c, p = r.cells[m], r.paper.get(m)
            d = diff(c, p)
            w.writerow(
                [table.name, r.key, r.label, m]
                + ([f"{c.mean:.6f}", f"{c.lo:.6f}", f"{c.hi:.6f}"] if c.n else ["", "", ""])
                + [c.n, "" if p is None else p, "" if d is None else f"{d:.6f}", "" if c.n else c.reason]
            )
    return buf.getvalue()


def plot_bars(table: Table, rows: list[RowResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = table.metrics
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(m) * max(1, len(rows)) / 2, 3.4))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(m))]
        ys = [r.cells[x].mean if r.cells[x].n else 0.0 for x in m]
        err = [
            [(r.cells[x].mean - r.cells[x].lo) if r.cells[x].n else 0 for x in m],
            [(r.cells[x].hi - r.cells[x].mean) if r.cells[x].n else 0 for x in m],
        ]
        bars = ax.bar(xs, ys, width, yerr=err, capsize=3, label=r.label, alpha=0.85)
        px = [(x, r.paper[k]) for x, k in zip(xs, m) if r.paper.get(k) is not None]
        if px:
            ax.scatter(
                [p[0] for p in px],
                [p[1] for p in px],
                marker="_",
                s=300,
                color="black",
                zorder=3,
                label="paper" if i == 0 else None,
            )
        for b, x in zip(bars, m):
            if not r.cells[x].n:
                ax.text(b.get_x() + b.get_width() / 2, 0.01, "n/a", ha="center", fontsize=7, rotation=90)
    ax.set_xticks(range(len(m)), [LABELS[x] for x in m])
    ax.set_ylabel("score (raw cosine; PRES lower is better)" if "pres" in m else "score (raw cosine)")
    ax.set_title(table.title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scatter(table: Table, rows: list[RowResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = "clip_t" if "clip_t" in table.metrics else "clip_i"
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    for r in rows:
        pts = [(s, d["dino"], d[y]) for s, d in r.per_subject.items() if "dino" in d and y in d]
        if not pts:
            continue
        sc = ax.scatter([p[1] for p in pts], [p[2] for p in pts], label=r.label, s=18)
        for s, a, b in pts:
            ax.annotate(s, (a, b), fontsize=5, alpha=0.7, color=sc.get_facecolor()[0])
    ax.set_xlabel("DINO (per subject)")
    ax.set_ylabel(f"{LABELS[y]} (per subject)")
    ax.set_title(f"{table.name}: subject vs prompt fidelity", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(
    folder: Path, names: list[str] | None = None, out: Path | None = None
) -> dict[str, list[RowResult]]:
    from analysis.report import write_report
    from dreambench.utils.io import atomic_write_text

    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"analysis.tables: error: no such folder: {folder}")
    found = {r.table for r in find_runs(folder)}
    names = names or sorted(t for t in found if t in TABLES)
    if not names:
        raise SystemExit(
            f"analysis.tables: error: no run folders of a table recipe under {folder} (their "
            f"config.yaml has no recipe.table; see experiments/README.md)"
        )
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise SystemExit(
            f"analysis.tables: error: unknown table {', '.join(unknown)} (known: {', '.join(TABLES)})"
        )
    out = Path(out) if out else folder / "tables"
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        table = TABLES[name]
        rows = build(folder, table)
        atomic_write_text(out / f"{name}.md", to_markdown(table, rows))
        atomic_write_text(out / f"{name}.tex", to_latex(table, rows))
        atomic_write_text(out / f"{name}.csv", to_csv(table, rows))
        atomic_write_text(out / f"{name}_directions.csv", directions_csv(table, rows))
        plot_bars(table, rows, out / f"{name}_bars.png")
        plot_scatter(table, rows, out / f"{name}_scatter.png")
        results[name] = rows
    write_report(folder, out, {n: (TABLES[n], rows) for n, rows in results.items()})
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m analysis.tables", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a table's output folder (experiments/table1, ...)")
    p.add_argument("--table", action="append", choices=sorted(TABLES), help="default: every table found")
    p.add_argument("--out", type=Path, default=None, help="default: <folder>/tables")
    a = p.parse_args(argv)
    results = render(a.folder, a.table, a.out)
    out = a.out or a.folder / "tables"
    for name in results:
        sys.stdout.write((out / f"{name}.md").read_text() + "\n")
    print(f"analysis.tables: wrote {out}/ (report.html)")


if __name__ == "__main__":
    main()
