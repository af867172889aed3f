"""`make bench`: dreambench against a hand-written reference loop, side by side, on this machine.

    python -m bench.run [--quick] [--cases overhead,switches,...] [--out bench/results] [--threads N]

Writes bench/results/bench-<time>.json and .md (and latest.json / latest.md) and prints the table. GPU cases
detect the absence of CUDA and report "skipped: no CUDA device". Timings never enter the test suite.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bench import cases
from bench.common import REPO, machine, write_results

CASES = ("overhead", "switches", "syncs", "startup", "whole_run", "class_images", "scoring", "full_size", "families",
         "memory_plan")


def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# dreambench benchmark ({result['started']})", "",
             (f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), "
              f"device **{m['device']}**, torch {m['torch']}, diffusers {m.get('diffusers', '?')}, "
              f"lightning {m.get('lightning', '?')}; load average at start {m['load_average_at_start']}."),
             (f"Command: `{result['command']}`; each timing: median of n runs, spread as [Q1–Q3] (min–max); "
              f"{result['settings']['warmup']} warm-up steps excluded, {result['settings']['steps']} timed steps."),
             "", "| case | variant | median | spread [Q1–Q3] (min–max) | n | vs | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("skipped"):
            lines.append(f"| {r['case']} | {r['variant']} | {r['skipped']} | | | | {r.get('what', '')} |")
            continue
        spread = (f"[{fmt(r.get('q1'))}–{fmt(r.get('q3'))}] ({fmt(r.get('min'))}–{fmt(r.get('max'))})"
                  if r.get("n", 1) > 1 else "")
        vs = "; ".join(f"{v:.2f}× {k}" for k, v in (r.get("ratio_vs") or {}).items())
        if r.get("paired_ratio") is not None:
            vs += f" (paired runs: {r['paired_ratio']:.2f}×; by CPU time: {r['cpu_time_ratio']:.2f}×)"
        notes = []
        if r.get("steps_per_cpu_s"):
            c = r["steps_per_cpu_s"]
            notes.append(f"{fmt(c['median'])} steps per CPU-second [{fmt(c['q1'])}–{fmt(c['q3'])}]")
        if r.get("mfu") is not None:
            notes.append(f"MFU {100 * r['mfu']:.1f}%")
        if r.get("peak_allocated_gb") is not None:
            notes.append(f"peak {r['peak_allocated_gb']:.2f} GB")
        if r.get("memory_plan_gb") is not None:
            notes.append(f"planned {r['memory_plan_gb']:.2f} GB")
        if r.get("speedup_vs_reference_as_used") is not None:
            vs = f"{r['speedup_vs_reference_as_used']:.2f}× reference, as used"
        if r.get("sites"):
            notes.append("from " + ", ".join(f"{k} ×{v}" for k, v in list(r["sites"].items())[:4]))
        if r.get("fits_gb") is not None:
            notes.append("fits " + (" / ".join(f"{c}" for c in r["fits_gb"]) + " GB" if r["fits_gb"] else "no card")
                         + (f" (`{r['overrides']}`)" if r.get("overrides") else ""))
        if r.get("parts_gb"):
            notes.append(", ".join(f"{k} {v:.2f}" for k, v in r["parts_gb"].items()))
        if r.get("whole_run_s") is not None:
            notes.append(f"whole 1-step run {r['whole_run_s']:.1f} s")
        if r.get("first_step_s") is not None:
            notes.append(f"command -> first step {r['first_step_s']:.1f} s, steps {r['steps_s']:.1f} s, "
                         f"last step -> exit {r['exit_s']:.1f} s")
        if r.get("ratio_vs_reference") is not None:
            vs = f"{r['ratio_vs_reference']:.2f}× the reference's wall time (paired runs)"
        if r.get("switches") is not None:
            notes.append(f"rung: {r['switches']}")
        lines.append(f"| {r['case']} | {r['variant']} | {fmt(r['median'])} {r['unit']} | {spread} | "
                     f"{r.get('n', '')} | {vs} | {'; '.join(notes) or r.get('what', '')} |")
    lines += ["", ("Where a variant reads *as used*, each side does what it normally does (the reference: the "
                   "diffusers example's VAE + text encoding every step); *equal work* gives both the same cached "
                   "latents, embeddings and optimizer kernel, so the remaining gap is the framework (Lightning) "
                   "itself.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a minute-scale smoke run (tests use it); not for figures")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    # One thread by default on CPU: on a small shared machine, OpenMP's spinning worker threads turn any other
    # load into 10-20x slower, wildly varying steps; one thread per process gives stable, comparable figures.
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 without CUDA)")
    a = ap.parse_args(argv)
    chosen = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    cuda = torch.cuda.is_available()
    threads = a.threads or (torch.get_num_threads() if cuda else 1)
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric",
                 "dreambench"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=out))
    q = a.quick
    s = cases.Settings(work, reps=a.reps or (2 if q else 5), warmup=a.warmup or (1 if q else 5),
                       steps=a.steps or (3 if q else 40), quick=q, cuda=cuda,
                       log=lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    result: dict[str, Any] = {"started": started, "command": " ".join(["python -m bench.run", *(argv or sys.argv[1:])]),
                              "machine": {**machine(), "torch_threads": threads},
                              "settings": {"reps": s.reps, "warmup": s.warmup, "steps": s.steps, "quick": q,
                                           "cases": chosen},
                              "targets": {"cpu_overhead": "dreambench >= 0.9x the reference loop's steps/s",
                                          "gpu_sd15": "<= 30 ms/step, >= 2x the reference loop, peak <= reference",
                                          "class_images": ">= 3 images/s at 512², 50 steps, guidance (H100/H200)"},
                              "rows": []}
    try:
        cases.prepare_work(s)
        from omegaconf import OmegaConf

        from dreambench.models.tiny import ensure_tiny_model
        tiny_ref = str(ensure_tiny_model(OmegaConf.select(cases.compose(["model=tiny"]), "model.pretrained")))
        ctx: dict[str, Any] = {"baseline": None}

        def overhead():
            rows = cases.case_overhead(s, tiny_ref)
            ctx["baseline"] = next((r["median"] for r in rows if r["variant"].startswith("dreambench, as used")),
                                   None)
            return rows
        run_case = {"overhead": overhead, "switches": lambda: cases.case_switches(s, ctx["baseline"]),
                    "syncs": lambda: cases.case_syncs(s, tiny_ref), "startup": lambda: cases.case_startup(s),
                    "whole_run": lambda: cases.case_whole_run(s, tiny_ref),
                    "class_images": lambda: cases.case_class_images(s, tiny_ref),
                    "scoring": lambda: cases.case_scoring(s), "full_size": lambda: cases.case_full_size(s),
                    "families": lambda: cases.case_families(s), "memory_plan": cases.case_memory_plan}
        for c in chosen:
            t0 = time.time()
            s.log(f"[bench] {c} ...")
            rows = run_case[c]()
            result["rows"] += rows
            s.log(f"[bench] {c}: {time.time() - t0:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_results(out, "bench", "latest", result, markdown(result))
    print(f"bench: wrote {path} and .md", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
