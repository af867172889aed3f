"""Compare runs: `python -m analysis.compare <sweep folder | runs folder> [--out DIR]`.

Reads only what runs and sweeps leave on disk: each run folder's config.yaml, metrics.json and logs/metrics.csv
(the CSV logger), and, for a sweep folder, its sweep.json and Optuna storage (study.journal, or the URL given
with --storage). Writes to <folder>/compare/ (or --out):

    trials.csv, trials.md   one row per trial / run: state, parameters, metrics, wall time, failure reason
    best.md                 the best trial (one objective) or the Pareto front (several)
    <metric>_vs_<param>.png each objective against each searched parameter (lr on a log axis)
    pareto.png              the first two objectives against each other, the front highlighted
    loss_curves.png         train/loss_instance (and loss_prior) per trial, from the CSV logs
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARAM_KEYS = ("optimizer.lr", "prior.weight", "trainer.max_steps")  # what a runs folder is compared on
LOSS_KEYS = ("train/loss_instance", "train/loss_prior")
DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}


@dataclass
class Row:
    name: str
    state: str
    params: dict[str, Any]
    metrics: dict[str, float]
    run_dir: Path | None
    wall_time_s: float | None = None
    reason: str = ""
    number: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class CompareError(Exception):
    pass


# ---- reading ------------------------------------------------------------------------------------------
def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _select(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_run(run_dir: Path) -> Row:
    import yaml
    metrics = _load_json(run_dir / "metrics.json")
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    params = {k: v for k in PARAM_KEYS if (v := _select(cfg, k)) is not None}
    state = "COMPLETE" if metrics else ("PRUNED" if (run_dir / "pruned.json").is_file() else "INCOMPLETE")
    return Row(run_dir.name, state, params, _numeric(metrics), run_dir, metrics.get("wall_time_s"))


def find_runs(folder: Path) -> list[Path]:
    runs = {p.parent for p in folder.rglob("config.yaml") if "compare" not in p.parts and ".hydra" not in p.parts}
    return sorted(runs, key=lambda p: str(p))


def read_sweep(folder: Path, storage: str | None) -> tuple[list[Row], dict[str, Any], Any]:
    import optuna
    from optuna.trial import TrialState

    card = _load_json(folder / "sweep.json")
    journal = folder / "study.journal"
    url = storage or (str(journal) if journal.is_file() else card.get("storage"))
    if not url:
        raise CompareError(f"{folder}: no study.journal and no storage in sweep.json; give --storage URL")
    if "://" in url:
        st: Any = url
    else:
        if not Path(url).is_file():
            raise CompareError(f"{folder}: the study storage {url} does not exist")
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        st = JournalStorage(JournalFileBackend(url))
    names = optuna.study.get_all_study_names(st)
    name = card.get("study_name") or (names[0] if len(names) == 1 else None)
    if name not in names:
        raise CompareError(f"study {name!r} not in {url} (it holds: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=name, storage=st)
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        run_dir = folder / f"trial_{t.number}"
        if not run_dir.is_dir():
            rd = t.user_attrs.get("run_dir")
            run_dir = Path(rd) if rd and Path(rd).is_dir() else None
        on_disk = read_run(run_dir) if run_dir else None
        metrics = dict(on_disk.metrics) if on_disk else {}
        metrics.update({k: float(v) for k, v in (t.user_attrs.get("metrics") or {}).items()})
        wall = t.user_attrs.get("wall_time_s") or (on_disk.wall_time_s if on_disk else None)
        if wall is None and t.datetime_start and t.datetime_complete:
            wall = (t.datetime_complete - t.datetime_start).total_seconds()
        flags = [k.split(":", 1)[1] for k in ("dreambench:stale", "dreambench:surplus") if t.system_attrs.get(k)]
        rows.append(Row(f"trial_{t.number}", t.state.name, dict(t.params), metrics, run_dir, wall,
                        str(t.user_attrs.get("fail_reason", "")), t.number,
                        {"retry_of": t.user_attrs.get("retry_of"), "flags": ",".join(flags),
                         "values": list(t.values) if t.values else None}))
    return rows, card, study


# ---- best / Pareto --------------------------------------------------------------------------------
def pareto(rows: list[Row], metrics: list[str], directions: list[str]) -> list[Row]:
    """Non-dominated complete rows (used for runs folders; a sweep's front comes from Optuna)."""
    sign = [1.0 if d == "maximize" else -1.0 for d in directions]
    pts = [(r, [s * r.metrics[m] for s, m in zip(sign, metrics)]) for r in rows
           if r.state == "COMPLETE" and all(m in r.metrics and math.isfinite(r.metrics[m]) for m in metrics)]
    front = []
    for r, p in pts:
        dominated = any(all(q_i >= p_i for q_i, p_i in zip(q, p)) and any(q_i > p_i for q_i, p_i in zip(q, p))
                        for _, q in pts)
        if not dominated:
            front.append(r)
    return front


# ---- writing ----------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(rows: list[Row], metrics: list[str], best: set[str]) -> tuple[list[str], list[list[Any]]]:
    params = sorted({k for r in rows for k in r.params})
    others = sorted({k for r in rows for k in r.metrics} - set(metrics))
    header = ["trial", "state", *params, *metrics, *others, "wall_time_s", "best", "reason"]
    body = []
    for r in rows:
        reason = r.reason + (f" [{r.extra['flags']}]" if r.extra.get("flags") else "")
        body.append([r.name, r.state, *[r.params.get(p) for p in params], *[r.metrics.get(m) for m in metrics],
                     *[r.metrics.get(m) for m in others], r.wall_time_s, "*" if r.name in best else "",
                     reason.replace("\n", " ")])
    return header, body


def markdown(header: list[str], body: list[list[Any]]) -> str:
    def esc(v: Any) -> str:
        return _fmt(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def loss_curve(run_dir: Path | None) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value)]} from the CSV logger's logs/metrics.csv (Lightning writes one row per log call)."""
    if run_dir is None:
        return {}
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return {}
    out: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for rec in csv.DictReader(f):
            for key in LOSS_KEYS:
                v = rec.get(key)
                if v not in (None, "") and rec.get("step") not in (None, ""):
                    out.setdefault(key, []).append((int(float(rec["step"])), float(v)))
    return out


def plots(rows: list[Row], metrics: list[str], front: list[Row], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    done = [r for r in rows if r.state == "COMPLETE"]
    front_names = {r.name for r in front}
    params = sorted({k for r in rows for k, v in r.params.items() if isinstance(v, (int, float))})
    for m in metrics:
        for p in params:
            pts = [(r.params[p], r.metrics[m], r.name in front_names) for r in done
                   if p in r.params and m in r.metrics]
            if not pts:
                continue
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.scatter([x for x, _, f in pts if not f], [y for _, y, f in pts if not f], c="tab:blue", label="trial")
            ax.scatter([x for x, _, f in pts if f], [y for _, y, f in pts if f], c="tab:red", label="best / front")
            if p == "optimizer.lr" or (all(x > 0 for x, _, _ in pts) and max(x for x, _, _ in pts) /
                                       max(min(x for x, _, _ in pts), 1e-300) > 100):
                ax.set_xscale("log")
            ax.set_xlabel(p)
            ax.set_ylabel(m)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{_slug(m)}_vs_{_slug(p)}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    if len(metrics) >= 2:
        a, b = metrics[:2]
        pts = [(r.metrics[a], r.metrics[b], r.name in front_names, r.name) for r in done
               if a in r.metrics and b in r.metrics]
        if pts:
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.scatter([x for x, _, f, _ in pts if not f], [y for _, y, f, _ in pts if not f], c="tab:blue",
                       label="trial")
            fr = sorted((x, y) for x, y, f, _ in pts if f)
            ax.plot([x for x, _ in fr], [y for _, y in fr], "o-", c="tab:red", label="Pareto front")
            for x, y, _, n in pts:
                ax.annotate(n.replace("trial_", ""), (x, y), fontsize=6)
            ax.set_xlabel(a)
            ax.set_ylabel(b)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / "pareto.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    curves = [(r.name, loss_curve(r.run_dir)) for r in rows]
    curves = [(n, c) for n, c in curves if c]
    if curves:
        keys = [k for k in LOSS_KEYS if any(k in c for _, c in curves)]
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for name, c in curves:
                if key in c:
                    ax.plot([s for s, _ in c[key]], [v for _, v in c[key]], label=name, lw=1)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.set_yscale("log")
        axes[0][0].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = out / "loss_curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s).strip("_")


def _parse_metrics(specs: list[str] | None) -> tuple[list[str], list[str]] | None:
    if not specs:
        return None
    names, dirs = [], []
    for spec in specs:
        name, _, d = spec.rpartition(":") if ":" in spec else (spec, "", "max")
        if d not in DIRECTIONS:
            raise CompareError(f"--metric {spec}: the direction is max or min (e.g. val/dino:max)")
        names.append(name)
        dirs.append(DIRECTIONS[d])
    return names, dirs


def compare(folder: Path, out: Path | None = None, storage: str | None = None,
            metric_specs: list[str] | None = None) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CompareError(f"{folder} is not a folder (give a sweep folder or a folder of run folders)")
    out = Path(out) if out else folder / "compare"
    chosen = _parse_metrics(metric_specs)
    is_sweep = (folder / "sweep.json").is_file() or (folder / "study.journal").is_file() or storage
    study = None
    if is_sweep:
        rows, card, study = read_sweep(folder, storage)
        metrics, directions = chosen or (card.get("metrics") or [], card.get("directions") or [])
        if not metrics:
            metrics, directions = list(study.metric_names or []), [d.name.lower() for d in study.directions]
    else:
        rows = [read_run(p) for p in find_runs(folder)]
        for r in rows:  # runs of several subjects share timestamp names: name them by their path
            r.name = str(r.run_dir.relative_to(folder)) if r.run_dir else r.name
        if not rows:
            raise CompareError(f"{folder}: no run folders (a run folder holds config.yaml) and no sweep.json")
        if chosen:
            metrics, directions = chosen
        else:
            have = {k for r in rows for k in r.metrics}
            metrics = [m for m in ("val/dino", "val/clip_t") if m in have] or ["train/loss_instance"]
            directions = ["minimize" if m.startswith("train/") else "maximize" for m in metrics]
    weights = card.get("weights") if is_sweep and not chosen else None
    if study is not None and not chosen:
        try:
            best_numbers = {t.number for t in study.best_trials}
        except ValueError:  # no complete trial
            best_numbers = set()
        front = [r for r in rows if r.number in best_numbers]
    elif weights:
        front = []
    else:
        front = pareto(rows, metrics, directions)
        if len(metrics) == 1 and front:  # one objective: the best, ties included
            front = [r for r in front if r.metrics[metrics[0]] == front[0].metrics[metrics[0]]]
    out.mkdir(parents=True, exist_ok=True)
    best_names = {r.name for r in front}
    header, body = table(rows, metrics, best_names)
    with (out / "trials.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(body)
    (out / "trials.md").write_text(markdown(header, body))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    title = "Pareto front" if len(metrics) > 1 and not weights else "Best trial"
    objective = ", ".join(f"{m} ({d})" for m, d in zip(metrics, directions))
    if weights:
        objective = "sum of " + " + ".join(f"{w:g} x {m} ({d})" for w, m, d in zip(weights, metrics, directions))
    fh, fb = table(front, metrics, best_names)
    (out / "best.md").write_text(
        f"# {folder.name}\n\nObjective: {objective}\n\n"
        f"Trials: {', '.join(f'{v} {k.lower()}' for k, v in sorted(counts.items()))}\n\n"
        f"## {title}\n\n" + (markdown(fh, fb) if front else "no complete trial\n"))
    images = plots(rows, metrics, front, out)
    return {"out": out, "rows": rows, "front": front, "metrics": metrics, "directions": directions,
            "images": images}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a sweep folder (sweep.json, study.journal, trial_*/) or a runs folder")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default <folder>/compare)")
    ap.add_argument("--storage", default=None, help="the study's storage URL when it is not <folder>/study.journal, "
                    "e.g. postgresql+psycopg://user@host/db (password from PGPASSWORD or ~/.pgpass)")
    ap.add_argument("--metric", action="append", help="metric[:max|min], repeatable (default: the sweep's "
                    "objectives; for runs: val/dino and val/clip_t, else train/loss_instance)")
    args = ap.parse_args(argv)
    try:
        res = compare(args.folder, args.out, args.storage, args.metric)
    except CompareError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    print(f"compare: {len(res['rows'])} trials, {len(res['front'])} best -> {res['out']}")
    for r in res["front"]:
        vals = ", ".join(f"{m}={r.metrics[m]:.4g}" for m in res["metrics"] if m in r.metrics)
        print(f"  {r.name}: {r.params} {vals}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
