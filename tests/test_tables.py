"""analysis.tables / analysis.report on run folders, and the table recipes end to end on the tiny model."""

from __future__ import annotations

import csv
import html
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from analysis import paper, tables
from tests.methods_helpers import REPO, env_defaults


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    env_defaults(tmp_path_factory.mktemp("tables"))


def _run(root: Path, table: str, row: str, subject: str, seed: int, scores: dict, images: int = 0,
         model: str | None = None) -> Path:
    run = root / table / row / f"{subject}-s{seed}"
    (run / "eval").mkdir(parents=True)
    cfg = {
        "recipe": {"table": table, "row": row},
        "data": {"subject": subject, "class_noun": "dog"},
        "seed": seed,
        "model": {"build_tiny": False, **({"name": model} if model else {})},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {
        k: ({"mean": v, "per_subject": {subject: v}} if isinstance(v, float) else v)
        for k, v in scores.items()
    }
    (run / "eval" / "metrics.json").write_text(
        json.dumps({"metrics": metrics, "protocol": {"encoders": {"dino": "x"}}})
    )
    if images:
        sub = run / "eval" / "images" / subject
        sub.mkdir(parents=True)
        for i in range(images):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(sub / f"00_{i}.png")
        (run / "eval" / "images" / "prompts.json").write_text(
            json.dumps(
                {"subjects": {subject: {"real_folder": os.environ["DREAMBENCH_DATA"] + f"/{subject}"}}}
            )
        )
    return run


def test_table1_numbers_intervals_paper_column_and_report(tmp_path):
    rng = np.random.default_rng(0)
    db = {s: float(v) for s, v in zip(["dog", "cat", "can"], rng.uniform(0.5, 0.7, 3))}
    for s, v in db.items():
        _run(
            tmp_path,
            "table1",
            "dreambooth",
            s,
            0,
            {"dino": v, "clip_i": 0.8, "clip_t": 0.3, "div": "unavailable: no LPIPS weights"},
            images=3,
        )
    # Two seeds of one subject: averaged within the subject first, so the subject still counts once.
    _run(tmp_path, "table1", "textual_inversion", "dog", 0, {"dino": 0.50, "clip_i": 0.7, "clip_t": 0.2})
    _run(tmp_path, "table1", "textual_inversion", "dog", 1, {"dino": 0.60, "clip_i": 0.7, "clip_t": 0.2})
    _run(tmp_path, "table1", "textual_inversion", "cat", 0, {"dino": 0.70, "clip_i": 0.7, "clip_t": 0.2})
    (tmp_path / "real" / "eval").mkdir(parents=True)
    (tmp_path / "real" / "eval" / "metrics.json").write_text(
        json.dumps(
            {
                "metrics": {"dino": {"mean": 0}, "clip_t": "n/a (real images row)"},
                "per_subject": {
                    "dog": {"dino": 0.8, "clip_i": 0.9},
                    "cat": {"dino": 0.7, "clip_i": 0.9},
                    "vase": {"dino": 0.1, "clip_i": 0.1},
                },
            }
        )
    )  # vase: no run of the table, left out

    rows = {r.key: r for r in tables.render(tmp_path)["table1"]}
    out = tmp_path / "tables"
    dino = rows["dreambooth"].cells["dino"]
    assert dino.n == 3 and dino.mean == pytest.approx(np.mean(list(db.values())))
    assert dino.lo <= dino.mean <= dino.hi and dino.lo >= min(db.values()) and dino.hi <= max(db.values())
    ti = rows["textual_inversion"].cells["dino"]
    assert ti.n == 2 and ti.mean == pytest.approx((0.55 + 0.70) / 2)
    real = rows["real"].cells
    assert real["dino"].n == 2 and real["dino"].mean == pytest.approx(0.75)
    assert real["clip_t"].n == 0

    by = {(r["row"], r["metric"]): r for r in csv.DictReader((out / "table1.csv").open())}
    assert float(by["dreambooth", "dino"]["paper"]) == 0.668  # the paper column from PROTOCOL.md
    assert float(by["textual_inversion", "clip_t"]["paper"]) == 0.255
    assert float(by["real", "clip_i"]["paper"]) == 0.885 and by["real", "clip_t"]["paper"] == ""
    assert float(by["dreambooth", "dino"]["diff"]) == pytest.approx(dino.mean - 0.668, abs=1e-6)
    md = (out / "table1.md").read_text()
    assert (
        "| DreamBooth (Stable Diffusion) | " + f"{dino.mean:.3f} [{dino.lo:.3f}, {dino.hi:.3f}] | 0.668 |"
        in md
    )
    assert "Imagen" in md and "SMOKE" not in md
    tex = (out / "table1.tex").read_text()
    assert r"\begin{tabular}" in tex and "0.569" in tex and r"Textual Inversion" in tex
    for png in ("table1_bars.png", "table1_scatter.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 200
    report = (out / "report.html").read_text()
    assert "grids/dreambooth__dog-s0.png" in report and (out / "grids" / "dreambooth__cat-s0.png").is_file()
    assert "not evaluated" not in report.split("Images per subject")[0]
    assert "Known differences" in report and "sampler" in report.lower()


def test_unevaluated_runs_and_unavailable_metrics_say_why(tmp_path):
    _run(
        tmp_path, "table3", "with_prior", "dog", 0, {"dino": 0.6, "pres": 0.5, "div": "unavailable: no LPIPS"}
    )
    run = tmp_path / "table3" / "no_prior" / "dog-s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"recipe": {"table": "table3", "row": "no_prior"}, "data": {"subject": "dog"}, "seed": 0}
        )
    )
    tables.render(tmp_path, ["table3"])
    by = {(r["row"], r["metric"]): r for r in csv.DictReader((tmp_path / "tables" / "table3.csv").open())}
    assert by["with_prior", "div"]["note"].startswith("unavailable") and by["with_prior", "div"]["ours"] == ""
    assert by["no_prior", "dino"]["note"].startswith("not evaluated")
    assert float(by["no_prior", "pres"]["paper"]) == 0.664
    with pytest.raises(SystemExit, match="no run folders"):
        tables.render(tmp_path / "table3" / "with_prior" / "dog-s0" / "eval")


def test_directions_are_paired_differences_over_the_subjects_both_rows_have(tmp_path):
    # Table 4 orders correct > wrong > none on DINO and CLIP-I. Here correct beats wrong on every subject, none beats
    # wrong on every subject (reversed), and correct vs none is mixed; "cat" has no "none" run (left out of pairs).
    scores = {"correct": {"dog": 0.70, "can": 0.60, "cat": 0.50},
              "wrong": {"dog": 0.50, "can": 0.40, "cat": 0.45},
              "none": {"dog": 0.80, "can": 0.42}}
    for row, per in scores.items():
        for subject, v in per.items():
            _run(tmp_path, "table4", row, subject, 0, {"dino": v})
    rows = tables.render(tmp_path, ["table4"])["table4"]
    found = {(d.higher, d.lower, d.metric): d for d in tables.directions(paper.TABLES["table4"], rows)}
    cw = found["correct", "wrong", "dino"]
    assert cw.diff.n == 3 and cw.diff.mean == pytest.approx((0.2 + 0.2 + 0.05) / 3) and cw.verdict == "holds"
    assert cw.paper_diff == pytest.approx(0.744 - 0.454)
    wn = found["wrong", "none", "dino"]
    assert wn.diff.n == 2 and wn.diff.mean == pytest.approx((-0.30 - 0.02) / 2) and wn.verdict == "reversed"
    cn = found["correct", "none", "dino"]
    assert cn.diff.lo < 0 < cn.diff.hi and cn.verdict == "not resolved"
    assert found["correct", "wrong", "clip_i"].verdict == "no data"
    by = {(r["higher"], r["lower"], r["metric"]): r
          for r in csv.DictReader((tmp_path / "tables" / "table4_directions.csv").open())}
    assert by["wrong", "none", "dino"]["verdict"] == "reversed" and by["correct", "wrong", "dino"]["n_subjects"] == "3"
    assert "| Correct class noun | Wrong class noun | DINO | +0.290 | +0.150 [" in (
        tmp_path / "tables" / "table4.md").read_text()
    assert "<td>reversed</td>" in (tmp_path / "tables" / "report.html").read_text()


def test_table3_checks_drift_at_equal_fidelity_so_a_prior_that_only_learns_less_fails_it(tmp_path):
    # DINO − PRES per run. A broken prior (the class half trained under the instance prompt: docs/TOY_WORLD.md)
    # lowers PRES by learning the subject less: PRES still "holds", DINO − PRES does not.
    good = {"with_prior": {"dog": (0.60, 0.30), "can": (0.50, 0.30), "cat": (0.55, 0.35)},
            "no_prior": {"dog": (0.65, 0.70), "can": (0.60, 0.65), "cat": (0.62, 0.66)}}
    broken = {**good, "with_prior": {"dog": (0.35, 0.45), "can": (0.30, 0.40), "cat": (0.33, 0.42)}}
    verdicts = []
    for name, runs in (("good", good), ("broken", broken)):
        for row, per in runs.items():
            for subject, (dino, pres) in per.items():
                _run(tmp_path / name, "table3", row, subject, 0,
                     {"dino": dino, "pres": pres, "div": "unavailable: no LPIPS weights"})
        rows = tables.render(tmp_path / name, ["table3"])["table3"]
        found = {(d.higher, d.lower, d.metric): d for d in tables.directions(paper.TABLES["table3"], rows)}
        sep = found["with_prior", "no_prior", "dino_minus_pres"]
        assert sep.paper_diff == pytest.approx((0.684 - 0.493) - (0.712 - 0.664))
        verdicts.append((found["no_prior", "with_prior", "pres"].verdict, sep.verdict, round(sep.diff.mean, 3)))
        assert "unavailable: no LPIPS weights" in rows[0].cells["div"].reason
    assert verdicts == [("holds", "holds", round(((0.3 + 0.05) + (0.2 + 0.05) + (0.2 + 0.04)) / 3, 3)),
                        ("holds", "reversed", round(((-0.1 + 0.05) + (-0.1 + 0.05) + (-0.09 + 0.04)) / 3, 3))]
    assert "DINO − PRES" in (tmp_path / "good" / "tables" / "table3.md").read_text()


def test_the_untrained_row_is_checked_below_both_methods_without_a_paper_number(tmp_path):
    # Table 1's untrained row is not in the paper: its orderings (each method above it on DINO and CLIP-I) are
    # checked like the paper's, with "n/a" where the paper's difference would be.
    for subject, (db, ti, base) in {"dog": (0.7, 0.5, 0.3), "cat": (0.6, 0.3, 0.35), "can": (0.8, 0.6, 0.2)}.items():
        _run(tmp_path, "table1", "dreambooth", subject, 0, {"dino": db, "clip_i": 0.8})
        _run(tmp_path, "table1", "textual_inversion", subject, 0, {"dino": ti, "clip_i": 0.7})
        _run(tmp_path, "table1", "untrained", subject, 0, {"dino": base, "clip_i": 0.75})
    rows = {r.key: r for r in tables.render(tmp_path, ["table1"])["table1"]}
    assert rows["untrained"].cells["dino"].mean == pytest.approx((0.3 + 0.35 + 0.2) / 3)
    found = {(d.higher, d.lower, d.metric): d for d in tables.directions(paper.TABLES["table1"], rows.values())}
    db = found["dreambooth", "untrained", "dino"]
    assert db.paper_diff is None and db.diff.mean == pytest.approx((0.4 + 0.25 + 0.6) / 3) and db.verdict == "holds"
    ti = found["textual_inversion", "untrained", "dino"]
    assert ti.diff.mean == pytest.approx((0.2 - 0.05 + 0.4) / 3) and ti.verdict == "not resolved"
    assert found["textual_inversion", "untrained", "clip_i"].verdict == "reversed"
    assert ("textual_inversion", "untrained", "clip_t") not in found  # the ordering is on DINO and CLIP-I
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert "| DreamBooth (Stable Diffusion) | Untrained model (not in the paper) | DINO | n/a | +0.417 [" in md
    by = {(r["higher"], r["lower"], r["metric"]): r
          for r in csv.DictReader((tmp_path / "tables" / "table1_directions.csv").open())}
    assert by["dreambooth", "untrained", "dino"]["paper_diff"] == "" and by["dreambooth", "untrained", "dino"][
        "verdict"] == "holds"
    assert "<td>Untrained model (not in the paper)</td><td>CLIP-I</td><td>n/a</td>" in (
        tmp_path / "tables" / "report.html").read_text()


def test_table1_rows_name_the_model_their_runs_trained_and_the_lora_row_shows_only_where_it_ran(tmp_path):
    sdxl, sd15 = tmp_path / "sdxl", tmp_path / "sd15"
    for subject, (db, lora, base) in {"dog": (0.7, 0.6, 0.3), "cat": (0.6, 0.5, 0.35), "can": (0.8, 0.7, 0.2)}.items():
        _run(sdxl, "table1", "dreambooth", subject, 0, {"dino": db, "clip_i": 0.8}, model="sdxl")
        _run(sdxl, "table1", "lora", subject, 0, {"dino": lora, "clip_i": 0.8}, model="sdxl")
        _run(sdxl, "table1", "untrained", subject, 0, {"dino": base, "clip_i": 0.75}, model="sdxl")
        _run(sd15, "table1", "dreambooth", subject, 0, {"dino": db, "clip_i": 0.8}, model="sd15")
    rows = {r.key: r for r in tables.render(sdxl, ["table1"])["table1"]}
    assert rows["dreambooth"].label == "DreamBooth (SDXL)"
    assert rows["lora"].label == "DreamBooth-LoRA (SDXL, not in the paper)"
    assert rows["textual_inversion"].label == "Textual Inversion (Stable Diffusion)"  # no runs: the paper's words
    assert rows["dreambooth"].paper["dino"] == 0.668  # still compared with the paper's SD row
    found = {(d.higher, d.lower, d.metric): d for d in tables.directions(paper.TABLES["table1"], rows.values())}
    lora = found["lora", "untrained", "dino"]
    assert lora.paper_diff is None and lora.diff.mean == pytest.approx((0.3 + 0.15 + 0.5) / 3) and lora.verdict == "holds"
    md = (sdxl / "tables" / "table1.md").read_text()
    assert "| DreamBooth-LoRA (SDXL, not in the paper) | 0.600 [" in md and "| DreamBooth (SDXL) | " in md

    rows = {r.key: r for r in tables.render(sd15, ["table1"])["table1"]}
    assert "lora" not in rows and rows["dreambooth"].label == "DreamBooth (SD 1.5)"
    assert "LoRA" not in (sd15 / "tables" / "table1.md").read_text().split("Known differences")[0]


def test_table1_script_adds_the_familys_lora_recipe():
    from analysis.recipes import lora_recipe
    assert lora_recipe(["model=sdxl"]) == "lora_sdxl" and lora_recipe(["model=tiny_sdxl"]) == "lora_sdxl"
    assert lora_recipe(["model=sd35_large"]) == "lora_sd35" and lora_recipe(["model=tiny_flux"]) == "lora_flux"
    assert lora_recipe(["model=sd15"]) is None and lora_recipe(["model=tiny"]) is None


def test_the_toolbox_table_is_each_switch_minus_the_baseline_paired_by_subject_and_seed(tmp_path):
    # Every (subject, seed) run is a unit of its own, paired with the baseline's run of the same subject and seed.
    base = {("dog", 0): 0.50, ("dog", 1): 0.60, ("cat", 0): 0.40, ("cat", 1): 0.30}
    shift = {"ema": {("dog", 0): 0.10, ("dog", 1): 0.05, ("cat", 0): 0.08, ("cat", 1): 0.02},    # all up
             "mask": {("dog", 0): -0.2, ("dog", 1): -0.1, ("cat", 0): -0.3, ("cat", 1): -0.1},    # all down
             "min_snr": {("dog", 0): 0.10, ("dog", 1): -0.1, ("cat", 0): 0.05, ("cat", 1): -0.05}}  # mixed
    for (subject, seed), v in base.items():
        _run(tmp_path, "toolbox", "baseline", subject, seed, {"dino": v, "pres": 0.5})
        for row, d in shift.items():
            _run(tmp_path, "toolbox", row, subject, seed, {"dino": v + d[subject, seed], "pres": 0.5 - d[subject, seed]})
    _run(tmp_path, "toolbox", "ema", "can", 0, {"dino": 0.9})  # no baseline run of can: left out of the pairs
    rows = tables.render(tmp_path, ["toolbox"])["toolbox"]
    by_row = {r.key: r for r in rows}
    assert by_row["baseline"].cells["dino"].n == 4 and by_row["ema"].cells["dino"].n == 5  # runs, not subjects
    assert by_row["baseline"].cells["dino"].mean == pytest.approx(0.45)
    found = {(d.higher, d.metric): d for d in tables.directions(paper.TABLES["toolbox"], rows)}
    assert {d.lower for d in found.values()} == {"baseline"}
    assert "baseline" not in {d.higher for d in found.values()}
    ema = found["ema", "dino"]
    assert ema.diff.n == 4 and ema.diff.mean == pytest.approx(0.0625) and ema.verdict == "raises"
    assert found["ema", "pres"].verdict == "lowers" and found["mask", "dino"].verdict == "lowers"
    assert found["min_snr", "dino"].verdict == "not resolved"
    assert found["noise_offset", "dino"].verdict == "no data"  # a row with no runs
    md = (tmp_path / "tables" / "toolbox.md").read_text()
    assert "| EMA of the weights | DINO | +0.063 [" in md and "| 4 | raises |" in md
    assert "paper" not in md.split("Effects:")[0].split("\n", 3)[2]  # no paper columns in a table of effects
    eff = {(r["higher"], r["metric"]): r for r in
           csv.DictReader((tmp_path / "tables" / "toolbox_directions.csv").open())}
    assert eff["mask", "dino"]["verdict"] == "lowers" and eff["ema", "dino"]["lower"] == "baseline"
    report = (tmp_path / "tables" / "report.html").read_text()
    assert "Effects (each switch" in report and "<td>raises</td>" in report


def test_toy_world_tables_say_to_compare_directions_not_values(tmp_path):
    run = _run(tmp_path, "table3", "with_prior", "toy_cup1", 0, {"dino": 0.4, "pres": 0.3})
    (run / "config.yaml").write_text(yaml.safe_dump({**yaml.safe_load((run / "config.yaml").read_text()),
                                                     "model": {"name": "toy", "build_tiny": False}}))
    tables.render(tmp_path, ["table3"])
    md = (tmp_path / "tables" / "table3.md").read_text()
    assert "TOY WORLD" in md and "not the values" in md and "SMOKE" not in md
    run.joinpath("config.yaml").write_text(yaml.safe_dump({**yaml.safe_load((run / "config.yaml").read_text()),
                                                           "model": {"name": "sd15"}}))
    tables.render(tmp_path, ["table3"])
    assert "TOY WORLD" not in (tmp_path / "tables" / "table3.md").read_text()


def _set_generation(run: Path, steps: int) -> None:
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    ev["protocol"]["generation"] = {"guidance": {"scheduler": "DDIMScheduler", "num_inference_steps": steps,
                                                 "guidance_scale": 7.5, "height": 32}, "images_per_prompt": 2,
                                    "n_prompts": 25}
    (run / "eval" / "metrics.json").write_text(json.dumps(ev))


def test_the_report_states_how_images_were_generated_and_flags_rows_evaluated_differently(tmp_path):
    a = _run(tmp_path, "table3", "with_prior", "dog", 0, {"dino": 0.6, "pres": 0.3})
    b = _run(tmp_path, "table3", "no_prior", "dog", 0, {"dino": 0.6, "pres": 0.5})
    for run in (a, b):
        _set_generation(run, 25)
    tables.render(tmp_path, ["table3"])
    md, page = (tmp_path / "tables" / "table3.md").read_text(), (tmp_path / "tables" / "report.html").read_text()
    line = "DDIMScheduler, 25 steps, guidance 7.5, 32 px, 2 images x 25 prompts"
    assert f"Generation (every run's eval/metrics.json): {line}." in md and line in page and "MIXED" not in md
    _set_generation(b, 50)  # one row evaluated at 50 DDIM steps: its scores are not comparable with the other's
    tables.render(tmp_path, ["table3"])
    md, page = (tmp_path / "tables" / "table3.md").read_text(), (tmp_path / "tables" / "report.html").read_text()
    assert "MIXED GENERATION SETTINGS" in md and "MIXED GENERATION SETTINGS" in page
    assert f"{line} (1 run: with_prior)" in md and "50 steps" in md and "(1 run: no_prior)" in md


def _set_training(run: Path, steps: int, num_images: int | None, lr: float = 3e-4) -> None:
    """What train() writes into a run's config.yaml about its training (the parts the tables' note reads)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["trainer"] = {"max_steps": steps, "accumulate_grad_batches": 1}
    cfg["optimizer"] = {"lr": lr}
    cfg["method"] = {"_target_": "dreambench.methods.DreamBooth"}
    cfg["data"]["batch_size"] = 1
    cfg["prior"] = ({"_target_": "dreambench.prior.GeneratedPrior", "weight": 1.0, "num_images": num_images}
                    if num_images else {"_target_": "dreambench.prior.NoPrior", "weight": 0.0, "num_images": 16})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_the_report_states_how_each_row_was_trained_and_flags_a_row_trained_two_ways(tmp_path):
    # The paper's notes name its ~1000 class images and 1000 steps; a toy table trains 300 steps on 16: the table
    # must say what its runs did, from their config.yaml, not what a recipe's default would be.
    with_prior = [_run(tmp_path, "table3", "with_prior", s, 0, {"dino": 0.6, "pres": 0.3}) for s in ("dog", "cat")]
    no_prior = _run(tmp_path, "table3", "no_prior", "dog", 0, {"dino": 0.6, "pres": 0.5})
    for run in with_prior:
        _set_training(run, 300, 16)
    _set_training(no_prior, 300, None)
    tables.render(tmp_path, ["table3"])
    md, page = (tmp_path / "tables" / "table3.md").read_text(), (tmp_path / "tables" / "report.html").read_text()
    note = ("Training (each run's config.yaml): With prior loss (λ = 1): 300 steps, lr 0.0003, batch 1, prior loss "
            "λ 1 on 16 generated class images; Without prior loss (λ = 0): 300 steps, lr 0.0003, batch 1, no prior "
            "loss.")
    assert f"- {note}" in md and html.escape(note) in page and "MIXED" not in md
    _set_training(with_prior[1], 300, 100)  # one subject's run of the row on 100 class images: its mean mixes two
    tables.render(tmp_path, ["table3"])
    md, page = (tmp_path / "tables" / "table3.md").read_text(), (tmp_path / "tables" / "report.html").read_text()
    assert "MIXED TRAINING SETTINGS" in md and "MIXED TRAINING SETTINGS" in page and "Training (each" not in md
    assert "on 16 generated class images (1 run)" in md and "on 100 generated class images (1 run)" in md
    assert "Without prior loss" not in md.split("MIXED TRAINING SETTINGS")[1].split("\n")[0]  # only the mixed row
    _set_training(with_prior[1], 300, 16)
    cfg = yaml.safe_load((no_prior / "config.yaml").read_text())
    cfg["model"].update(train_text_encoder=True, text_encoder_lr=1e-4)
    (no_prior / "config.yaml").write_text(yaml.safe_dump(cfg))
    tables.render(tmp_path, ["table3"])
    md = (tmp_path / "tables" / "table3.md").read_text()
    assert "Without prior loss (λ = 0): 300 steps, lr 0.0003, batch 1, text encoder trained (lr 0.0001), no prior " \
           "loss." in md and "MIXED" not in md


def test_each_run_is_counted_once_not_again_for_its_hydra_record(tmp_path):
    run = _run(tmp_path, "table3", "with_prior", "dog", 0, {"dino": 0.6})
    (run / ".hydra").mkdir()  # what a CLI run also writes: the same config, beside the run's own
    (run / ".hydra" / "config.yaml").write_text((run / "config.yaml").read_text())
    assert [r.folder for r in tables.find_runs(tmp_path)] == [run]


def test_a_run_with_recipe_also_is_a_row_of_each_table_it_names(tmp_path):
    # experiments/tables.sh trains DreamBooth once for Tables 1, 3 and 4 (conf/recipe/tables_dreambooth.yaml)
    run = _run(tmp_path, "table1", "dreambooth", "dog", 0, {"dino": 0.6, "pres": 0.2})
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["recipe"]["also"] = ["table3/with_prior", "table4/correct"]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    found = tables.find_runs(tmp_path)
    assert {(r.table, r.row) for r in found} == {("table1", "dreambooth"), ("table3", "with_prior"),
                                                 ("table4", "correct")}
    assert {r.folder for r in found} == {run} and all(r.scores["dino"] == 0.6 for r in found)
    cfg["recipe"]["also"] = ["table3"]  # not <table>/<row>: named, not silently dropped
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match="recipe.also entry 'table3' is not <table>/<row>"):
        tables.find_runs(tmp_path)


def test_the_shared_recipe_is_table1s_dreambooth_as_table3s_and_table4s_rows_are():
    from omegaconf import OmegaConf

    from tests.helpers import compose

    def recipe(name):
        cfg = OmegaConf.to_container(compose([f"+recipe={name}", "+experiment=dog"]), resolve=False)
        return cfg.pop("recipe"), cfg

    shared_recipe, shared = recipe("tables_dreambooth")
    assert shared_recipe["also"] == ["table3/with_prior", "table4/correct"]
    for name in ("table1_dreambooth", "table3_prior", "table4_correct"):
        assert recipe(name)[1] == shared, name  # the same training, only the label differs


def test_paper_numbers_match_protocol():
    text = REPO.parent / "shared" / "docs" / "PROTOCOL.md"
    if not text.is_file():
        pytest.skip("shared/docs/PROTOCOL.md is not next to the repository")
    doc = text.read_text()
    for t in paper.TABLES.values():
        for r in t.rows:
            for m, v in r.paper.items():
                if v is None:
                    continue
                if m in tables.DERIVED:  # not a number of the paper's: the difference of two that are
                    a, b = tables.DERIVED[m]
                    assert v == pytest.approx(r.paper[a] - r.paper[b], abs=5e-4), (t.name, r.key, m)
                else:
                    assert f"{v:.3f}" in doc, f"{t.name} {r.key}: {v} is not in PROTOCOL.md"


def test_wrong_class_is_seeded_and_never_the_subjects_own():
    from analysis.recipes import wrong_class
    from dreambench.data import dreambench as db

    classes = db.load_index(db.resolve_root(download=False)).classes
    picks = {s: wrong_class(s, 0) for s in classes}
    assert all(picks[s] != classes[s] and picks[s] in classes.values() for s in classes)
    assert picks == {s: wrong_class(s, 0) for s in classes}
    assert picks != {s: wrong_class(s, 1) for s in classes}


def _smoke(table: str, tmp_path: Path, subjects: str, *overrides: str) -> Path:
    out = tmp_path / table
    env = {**os.environ, "OUT": str(out), "SUBJECTS": subjects, "PY": sys.executable}
    r = subprocess.run(
        ["bash", str(REPO / "experiments" / f"{table}.sh"), "--smoke", *overrides],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _csv(out: Path, table: str) -> dict:
    return {(r["row"], r["metric"]): r for r in csv.DictReader((out / "tables" / f"{table}.csv").open())}


def test_table3_smoke_end_to_end(tmp_path):
    # The default suite's smoke table: one subject and 5 steps (the slow tests run table1/table4 as `--smoke` is).
    out = _smoke("table3", tmp_path, "dog", "trainer.max_steps=5")
    by = _csv(out, "table3")
    for row in ("with_prior", "no_prior"):
        assert by[row, "dino"]["ours"] and int(by[row, "dino"]["n_subjects"]) == 1
        assert by[row, "pres"]["ours"]  # class-prompt images were generated and scored
    assert float(by["with_prior", "pres"]["paper"]) == 0.493
    cfgs = {p.parent.parent.name: yaml.safe_load(p.read_text()) for p in out.glob("*/dog-s0/config.yaml")}
    assert cfgs["with_prior"]["prior"]["weight"] == 1.0 and cfgs["no_prior"]["prior"]["weight"] == 0.0
    report = (out / "tables" / "report.html").read_text()
    assert "SMOKE RUN" in report and "grids/no_prior__dog-s0.png" in report


@pytest.mark.slow
def test_table1_smoke_end_to_end(tmp_path):
    out = _smoke("table1", tmp_path, "dog,backpack")
    by = _csv(out, "table1")
    for row in ("real", "dreambooth", "textual_inversion"):
        assert by[row, "dino"]["ours"] and int(by[row, "dino"]["n_subjects"]) == 2
    assert (
        by["textual_inversion", "clip_t"]["ours"] and float(by["textual_inversion", "dino"]["paper"]) == 0.569
    )
    method = json.loads((out / "textual_inversion" / "dog-s0" / "model" / "method.json").read_text())
    assert method["method"] == "textual_inversion" and method["token"] == "<sks>"
    assert "0.774" in (out / "tables" / "table1.md").read_text()


@pytest.mark.slow
def test_table1_smoke_on_sdxl_has_the_lora_row_trained_with_its_recipe(tmp_path):
    out = _smoke("table1", tmp_path, "dog", "model=tiny_sdxl", "trainer.max_steps=2")
    by = _csv(out, "table1")
    for row in ("real", "dreambooth", "textual_inversion", "lora", "untrained"):
        assert by[row, "dino"]["ours"] and int(by[row, "dino"]["n_subjects"]) == 1, row
    cfg = yaml.safe_load((out / "lora" / "dog-s0" / "config.yaml").read_text())
    assert cfg["model"]["name"] == "tiny_sdxl" and cfg["method"]["rank"] == 4 and cfg["method"]["lr"] == 1e-4
    assert cfg["method"]["_target_"].endswith("LoRA") and cfg["trainer"]["max_steps"] == 2
    md = (out / "tables" / "table1.md").read_text()
    assert "| DreamBooth-LoRA (tiny SDXL, not in the paper) |" in md and "| Textual Inversion (tiny SDXL) |" in md


@pytest.mark.slow
def test_table4_smoke_end_to_end(tmp_path):
    from analysis.recipes import wrong_class

    out = _smoke("table4", tmp_path, "dog,backpack")
    by = _csv(out, "table4")
    for row in ("correct", "none", "wrong"):
        assert by[row, "dino"]["ours"] and int(by[row, "dino"]["n_subjects"]) == 2
    assert float(by["none", "dino"]["paper"]) == 0.303
    m = json.loads((out / "none" / "backpack-s0" / "metrics.json").read_text())
    assert m["instance_prompt"] == "a sks" and m["class_prompt"] == "a"
    m = json.loads((out / "wrong" / "backpack-s0" / "metrics.json").read_text())
    assert m["instance_prompt"] == f"a sks {wrong_class('backpack', 0)}"
    prompts = json.loads((out / "none" / "dog-s0" / "eval" / "images" / "prompts.json").read_text())
    assert prompts["subjects"]["dog"]["prompts"][0].startswith("a sks in ")  # "a sks in the jungle"


@pytest.mark.slow
def test_table1_toy_mode_runs_the_worlds_subjects_with_each_rows_toy_settings(tmp_path):
    # experiments/table1.sh --toy on a world written here; model=tiny and tiny encoders stand in for model=toy and
    # metrics=toy (built in ~40 min), so this checks the wiring: the world is the data set of every step, each
    # row gets its toy settings (Textual Inversion its own lr, no accumulation), the real row reads the world.
    from dreambench.world.world import world_folder, write_world

    cache = tmp_path / "cache"
    write_world(world_folder(cache), seed=0, progress=False)
    out = tmp_path / "table1"
    env = {**os.environ, "OUT": str(out), "SUBJECTS": "toy_cup1", "SEEDS": "0", "PY": sys.executable,
           "DREAMBENCH_CACHE": str(cache), "DREAMBENCH_DATA": str(tmp_path / "not-the-world"),
           "EVAL_ARGS": "metrics=tiny eval.prompts_limit=1 eval.images_per_prompt=1 eval.num_inference_steps=2 "
                        "eval.pres_images=0"}
    r = subprocess.run(["bash", str(REPO / "experiments" / "table1.sh"), "--toy", "model=tiny",
                        "trainer.max_steps=2", "++prior.num_images=2", "guidance.num_inference_steps=2"],
                       check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    db_cfg = yaml.safe_load((out / "dreambooth" / "toy_cup1-s0" / "config.yaml").read_text())
    ti_cfg = yaml.safe_load((out / "textual_inversion" / "toy_cup1-s0" / "config.yaml").read_text())
    assert db_cfg["paths"]["dataset_dir"] == str(world_folder(cache)) and db_cfg["optimizer"]["lr"] == 3e-4
    assert db_cfg["prior"]["num_images"] == 2 and db_cfg["data"]["class_noun"] == "cup"
    assert ti_cfg["method"]["lr"] == 5e-3 and ti_cfg["trainer"]["accumulate_grad_batches"] == 1
    base_cfg = yaml.safe_load((out / "untrained" / "toy_cup1-s0" / "config.yaml").read_text())
    assert base_cfg["trainer"]["max_steps"] == 0 and base_cfg["prior"]["weight"] == 0  # despite trainer.max_steps=2
    assert json.loads((out / "untrained" / "toy_cup1-s0" / "metrics.json").read_text())["steps"] == 0
    by = _csv(out, "table1")
    for row in ("real", "dreambooth", "textual_inversion", "untrained"):
        assert by[row, "dino"]["ours"] and int(by[row, "dino"]["n_subjects"]) == 1


@pytest.mark.slow
def test_toolbox_smoke_end_to_end_each_row_is_the_baseline_with_its_one_switch(tmp_path):
    out = _smoke("toolbox", tmp_path, "dog", "trainer.max_steps=3")
    cfgs = {p.parent.parent.name: yaml.safe_load(p.read_text()) for p in out.glob("*/dog-s0/config.yaml")}
    switched = {"min_snr": ("loss", "min_snr_gamma", 5.0), "noise_offset": ("loss", "noise_offset", 0.05),
                "input_perturbation": ("loss", "input_perturbation", 0.1), "mask": ("loss", "mask", True),
                "caption_dropout": ("data", "caption_dropout", 0.1)}
    assert set(cfgs) == {"baseline", "ema", *switched}

    def flat(d, pre=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{pre}{k}.").items() if isinstance(v, dict) else [(f"{pre}{k}", v)])}
    base = flat(cfgs["baseline"])
    for row, cfg in cfgs.items():
        changed = {k for k, v in flat(cfg).items() if base.get(k) != v} - {"recipe.row", "run_name", "paths.run_dir"}
        changed = {k for k in changed if not k.startswith(("hydra.", "paths."))}
        want = ({f"{switched[row][0]}.{switched[row][1]}"} if row in switched else
                {"train.ema.enabled", "train.ema.decay"} if row == "ema" else set())
        assert changed == want, row
        if row in switched:
            assert cfg[switched[row][0]][switched[row][1]] == switched[row][2]
    by = {(r["higher"], r["metric"]): r for r in csv.DictReader((out / "tables" / "toolbox_directions.csv").open())}
    assert {h for h, _ in by} == {"ema", *switched} and all(r["n_subjects"] == "1" for r in by.values())


@pytest.mark.slow
def test_tables_script_trains_dreambooth_once_for_all_three_tables_in_two_groups(tmp_path):
    out = tmp_path / "tables"
    env = {**os.environ, "OUT": str(out), "SUBJECTS": "dog,backpack", "JOBS": "2", "PY": sys.executable}
    r = subprocess.run(["bash", str(REPO / "experiments" / "tables.sh"), "--smoke", "trainer.max_steps=2"],
                       check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {p.name for p in out.iterdir() if p.is_dir()}
    # one folder per training: no with_prior / correct copies of the DreamBooth runs
    assert rows == {"dreambooth", "textual_inversion", "no_prior", "none", "wrong", "untrained", "real", "tables",
                    "logs"}
    assert sorted(p.name for p in (out / "dreambooth").iterdir() if p.is_dir()) == ["backpack-s0", "dog-s0"]
    assert {p.name for p in (out / "logs").iterdir()} == {"group0.log", "group1.log"}  # two groups side by side
    t1, t3, t4 = _csv(out, "table1"), _csv(out, "table3"), _csv(out, "table4")
    assert t3["with_prior", "dino"]["ours"] == t4["correct", "dino"]["ours"] == t1["dreambooth", "dino"]["ours"]
    for by, row in ((t1, "textual_inversion"), (t1, "untrained"), (t1, "real"), (t3, "no_prior"), (t4, "none"),
                    (t4, "wrong")):
        assert by[row, "dino"]["ours"] and int(by[row, "dino"]["n_subjects"]) == 2, row
    report = (out / "tables" / "report.html").read_text()
    assert all(f"Table {n}" in report for n in (1, 3, 4))


def test_tables_script_refuses_a_jobs_value_that_is_not_a_count_before_any_training(tmp_path):
    out = tmp_path / "tables"
    env = {**os.environ, "OUT": str(out), "SUBJECTS": "dog", "JOBS": "two", "PY": sys.executable}
    r = subprocess.run(["bash", str(REPO / "experiments" / "tables.sh"), "--smoke"], check=False, cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "tables: JOBS=two must be a whole number >= 1" in r.stderr, r.stderr[-2000:]
    assert not out.exists()  # nothing trained, no folder made
