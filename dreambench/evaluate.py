"""`python -m dreambench.evaluate`: DreamBench's DINO / CLIP-I / CLIP-T / PRES / DIV (shared/docs/PROTOCOL.md)
for trained runs, for a folder of images made elsewhere, or for the real images themselves.

    python -m dreambench.evaluate mode=run 'runs=[experiments/dog/2026-11-02_10-00-00]'
    python -m dreambench.evaluate mode=folder folder=/path/to/images
    python -m dreambench.evaluate mode=real

Writes <run or out_dir>/eval/: metrics.json (aggregates, bootstrap intervals, per-subject and per-prompt values,
protocol card), scores.csv (one row per image), contact_sheets/<subject>.png. Docs: docs/EVALUATION.md.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from dreambench.card import write_card
from dreambench.data import dreambench as db
from dreambench.metrics.functional import bootstrap_ci, clip_t_text
from dreambench.metrics.scorer import (UNAVAILABLE, EvalInputError, ImageSet, Item, MetricSet, Scorer, build_scorer,
                                       load_images, one_line)
from dreambench.utils.io import atomic_write_json, atomic_write_text
from dreambench.utils.logs import library_progress_bars

log = logging.getLogger("dreambench.evaluate")

MANIFEST = "prompts.json"
IMAGE_RE = re.compile(r"^(\d+)_(\d+)\.(png|jpe?g|webp)$", re.I)  # <prompt index>_<image index>.png
CLASS_RE = re.compile(r"^class_(\d+)\.(png|jpe?g|webp)$", re.I)  # bare class-prompt images (PRES)
CLASS_SEED_OFFSET = 1_000_000


def image_seed(base: int, prompt_index: int, image_index: int) -> int:
    # Independent of images_per_prompt and prompts_limit, so a smoke run's images are the full run's first ones,
    # and of the run's training seed, so every method is sampled from the same noise.
    return int(base) + 1000 * int(prompt_index) + int(image_index)


# ------------------------------------------------------------------------------------------------ inputs

def dataset_root(cfg: DictConfig) -> Path:
    try:
        return db.resolve_root(cfg.paths.dataset_dir, download=bool(cfg.paths.get("download", False)))
    except db.DatasetNotFoundError as e:
        raise EvalInputError(one_line(e)) from None


def dreambench_subject(root: Path, name: str) -> db.Subject:
    try:
        return db.subject(root, name)
    except KeyError as e:
        raise EvalInputError(one_line(e).strip("'\"")) from None


def subject_prompts(root: Path, live: bool, identifier: str, class_noun: str) -> list[str]:
    index = db.load_index(root)
    templates = index.live_prompts if live else index.object_prompts
    return [db.fill_prompt(t, identifier, class_noun) for t in templates]


def folder_image_sets(folder: Path, root: Path, eval_cfg: Mapping[str, Any], only: Sequence[str] | None = None
                      ) -> tuple[list[ImageSet], dict]:
    """Image sets of the documented layout (docs/EVALUATION.md):
    <folder>/<subject>/<p>_<k>.png (image k of prompt p of the subject's DreamBench prompt list),
    <folder>/<subject>/class_<k>.png (optional, PRES), <folder>/prompts.json (optional)."""
    if not folder.is_dir():
        raise EvalInputError(f"image folder not found: {folder}")
    manifest: dict = {}
    if (folder / MANIFEST).is_file():
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{folder / MANIFEST}: not valid JSON ({e})") from None
    described = manifest.get("subjects", {})
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "eval")
    if only:
        missing = [s for s in only if not (folder / s).is_dir()]
        if missing:
            raise EvalInputError(f"no image folder for subject(s) {', '.join(missing)} in {folder}")
        dirs = [folder / s for s in only]
    if not dirs:
        raise EvalInputError(f"no subject folders in {folder} (expected <subject>/<prompt>_<image>.png)")
    sets = []
    for d in dirs:
        info = described.get(d.name, {})
        if "real_folder" in info:
            real_folder, class_noun, live = Path(info["real_folder"]), info["class_noun"], bool(info.get("live"))
        else:
            s = dreambench_subject(root, d.name)
            real_folder, class_noun, live = s.folder, info.get("class_noun", s.class_noun), s.live
        identifier = info.get("identifier", manifest.get("identifier", eval_cfg.get("identifier", "sks")))
        prompts = info.get("prompts") or subject_prompts(root, live, identifier, class_noun)
        seeds = info.get("seeds", {})
        items, class_items = [], []
        for f in sorted(d.iterdir()):
            if m := IMAGE_RE.match(f.name):
                p, k = int(m.group(1)), int(m.group(2))
                if p >= len(prompts):
                    raise EvalInputError(f"{f}: prompt index {p} but subject {d.name!r} has {len(prompts)} prompts")
                items.append(Item(f, p, k, prompts[p], seeds.get(f.name)))
            elif m := CLASS_RE.match(f.name):
                class_prompt = info.get("class_prompt", f"a {class_noun}")
                class_items.append(Item(f, -1, int(m.group(1)), class_prompt, seeds.get(f.name)))
        if not items:
            raise EvalInputError(f"no images named <prompt index>_<image index>.png in {d}")
        items.sort(key=lambda it: (it.prompt_index, it.image_index))
        sets.append(ImageSet(d.name, class_noun, identifier, real_folder, items, class_items))
    return sets, manifest


def expand_runs(runs: Sequence[str] | str) -> list[Path]:
    """Run folders (holding config.yaml), or folders whose sub-folders are runs."""
    if isinstance(runs, str):
        runs = [runs]
    out: list[Path] = []
    for r in runs:
        p = Path(r).expanduser()
        if (p / "config.yaml").is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(c.parent for c in p.glob("*/config.yaml"))
            if not found:
                raise EvalInputError(f"{p}: not a run folder (no config.yaml) and holds no run folders")
            out += found
        else:
            raise EvalInputError(f"run folder not found: {p}")
    if not out:
        raise EvalInputError("mode=run needs runs=[<run folder>, ...]")
    return out


# ---------------------------------------------------------------------------------------------- generation

def _model_fingerprint(model_dir: Path) -> list:
    # Size and mtime of the weight files: a run re-trained into the same folder invalidates old eval images.
    return [[str(f.relative_to(model_dir)), f.stat().st_size, int(f.stat().st_mtime)]
            for f in sorted(model_dir.rglob("*.safetensors"))]


def generate_run_images(run: Path, run_cfg: DictConfig, identifier: str, root: Path, cfg: DictConfig) -> Path:
    """<run>/eval/images/<subject>/<p>_<k>.png (+ class_<k>.png) and prompts.json, unless already there."""
    from dreambench.methods import load_run_pipeline
    from dreambench.sampling import generate, make_scheduler

    data, ev = run_cfg.data, cfg.eval
    subject, class_noun, live = str(data.subject), str(data.class_noun), bool(data.live)
    prompts = subject_prompts(root, live, identifier, class_noun)
    if ev.prompts_limit:
        prompts = prompts[: int(ev.prompts_limit)]
    g = OmegaConf.to_container(run_cfg.guidance, resolve=True)
    guidance = {k: g.get(k) for k in ("scheduler", "num_inference_steps", "guidance_scale", "negative_prompt",
                                      "height", "width")}
    if g.get("guidance_rescale"):  # only when set, so the generation key of earlier runs is unchanged
        guidance["guidance_rescale"] = float(g["guidance_rescale"])
    if ev.num_inference_steps:
        guidance["num_inference_steps"] = int(ev.num_inference_steps)
    n, n_cls = int(ev.images_per_prompt), int(ev.pres_images)
    class_prompt = f"a {class_noun}"
    model_dir = run / "model"
    if not ((model_dir / "model_index.json").is_file() or (model_dir / "method.json").is_file()):
        # a whole pipeline (dreambooth) or method.json + an artefact (lora, textual_inversion)
        raise EvalInputError(f"{run}: no exported model ({model_dir} has neither model_index.json nor method.json)")
    generation = {"model": str(model_dir), "model_files": _model_fingerprint(model_dir), "guidance": guidance,
                  "images_per_prompt": n, "prompts_limit": ev.prompts_limit, "n_prompts": len(prompts),
                  "seed": int(ev.seed), "seed_rule": "seed + 1000 * prompt_index + image_index; class image k: "
                  f"seed + {CLASS_SEED_OFFSET} + k", "class_prompt": class_prompt, "class_images": n_cls}
    out = run / "eval" / "images"
    sub = out / subject
    names = [f"{p:02d}_{k}.png" for p in range(len(prompts)) for k in range(n)]
    cls_names = [f"class_{k:02d}.png" for k in range(n_cls)]
    old = {}
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
    # Where the run folder lies is not part of what made the images: a run moved or copied with its files' times
    # kept (mv, cp -a, rsync -a, tar) reuses them; its weights are told apart by model_files.
    def made_the_same(a: dict) -> bool:
        return {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in generation.items() if k != "model"}

    if (not ev.regenerate and made_the_same(old.get("generation") or {})
            and all((sub / f).is_file() for f in names + cls_names)):
        log.info("%s: reusing %d generated images", run, len(names) + len(cls_names))
        return out

    pipe = load_run_pipeline(run)  # any method's run: the base model plus its artefact
    pipe.scheduler = make_scheduler(guidance["scheduler"], pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    sub.mkdir(parents=True, exist_ok=True)
    seeds = {f"{p:02d}_{k}.png": image_seed(ev.seed, p, k) for p in range(len(prompts)) for k in range(n)}
    seeds |= {f"class_{k:02d}.png": int(ev.seed) + CLASS_SEED_OFFSET + k for k in range(n_cls)}
    all_prompts = [prompts[p] for p in range(len(prompts)) for _ in range(n)] + [class_prompt] * n_cls
    images = generate(pipe, all_prompts, [seeds[f] for f in names + cls_names], guidance,
                      batch_size=int(ev.batch_size), progress=bool(ev.progress), desc=f"eval {subject}")
    for name, im in zip(names + cls_names, images):
        im.save(sub / name)
    manifest = {"identifier": identifier, "generation": generation,
                "subjects": {subject: {"class_noun": class_noun, "live": live, "identifier": identifier,
                                       "prompts": prompts, "class_prompt": class_prompt, "seeds": seeds,
                                       "real_folder": str(real_folder_of(run_cfg, root))}}}
    atomic_write_json(out / MANIFEST, manifest)
    del pipe
    return out


def real_folder_of(run_cfg: DictConfig, root: Path) -> Path:
    instance_dir = run_cfg.data.get("instance_dir")
    if instance_dir:
        return Path(instance_dir)
    return dreambench_subject(root, str(run_cfg.data.subject)).folder


# ------------------------------------------------------------------------------------------------ outputs

def summarise(ms: MetricSet, mode: str, scorer: Scorer, boot: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, metric in ms.items():
        if mode == "real" and name in ("clip_t", "pres", "div"):
            out[name] = "n/a (real images row)"
            continue
        if name == "div" and not scorer.lpips_available:
            out[name] = scorer.lpips if scorer.lpips.startswith(UNAVAILABLE) else f"{UNAVAILABLE}: {scorer.lpips}"
            continue
        if not (metric.count > 0).any():
            out[name] = "n/a (no class-prompt images)" if name == "pres" else "n/a (no data)"
            continue
        r = metric.compute()
        per_subject = metric.per_subject()
        lo, hi = bootstrap_ci(list(per_subject.values()), int(boot["samples"]), int(boot["seed"]),
                              float(boot["level"]))
        out[name] = {"mean": float(r["mean"]), "ci95": [lo, hi], "mean_over_pairs": float(r["mean_over_pairs"]),
                     "n_subjects": len(per_subject), "higher_is_better": bool(metric.higher_is_better),
                     "per_subject": per_subject}
    return out


def protocol_card(mode: str, scorer: Scorer, cfg: DictConfig, root: Path | None, counts: dict,
                  generation: Any = None) -> dict[str, Any]:
    import diffusers
    import transformers

    rule = scorer.clip_t_rule
    pairing = ("every distinct pair of real images of a subject" if mode == "real"
               else "every generated image x every real image of its subject")
    return {
        "protocol": "DreamBench, DreamBooth (Ruiz et al., CVPR 2023) Table 1; shared/docs/PROTOCOL.md",
        "mode": mode,
        "encoders": scorer.card(),
        "scale": "raw cosine in [-1, 1]; no x100, no clamp",
        "pairing": f"DINO, CLIP-I: {pairing}; mean over pairs within a subject, then the unweighted mean over "
                   "subjects ('mean'); 'mean_over_pairs': the mean over all pairs of all subjects",
        "clip_t_text": {"rule": rule, "example": clip_t_text("a sks dog in the jungle", "sks", rule),
                        "pairing": "each image with the text of its own prompt"},
        "pres": "DINO of bare class-prompt images ('a {class noun}') x the subject's real images, all pairs; "
                "lower is better",
        "div": "mean LPIPS (AlexNet) over the pairs among the images of each (subject, prompt), mean over "
               "prompts, then subjects",
        "bootstrap": {**OmegaConf.to_container(cfg.eval.bootstrap), "over": "subjects", "interval": "percentile"},
        "generation": generation,
        "eval_overrides": {k: cfg.eval.get(k) for k in ("images_per_prompt", "prompts_limit", "num_inference_steps",
                                                        "pres_images", "seed")},
        "image_counts": counts,
        "dataset": str(root) if root else None,
        "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "diffusers": diffusers.__version__},
    }


def _thumb(im, size: int):
    w, h = im.size
    s = min(w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size))


def write_contact_sheets(eval_dir: Path, records: list[dict], real: Mapping[str, Sequence[Path]], size: int) -> None:
    from dreambench.sampling import image_grid

    by_subject: dict[str, list[dict]] = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r)
    (eval_dir / "contact_sheets").mkdir(parents=True, exist_ok=True)
    for subject, recs in by_subject.items():
        real_paths = list(real.get(subject, []))
        gen = [r for r in recs if r["prompt_index"] != "real"]
        tiles = [_thumb(im, size) for im in load_images(real_paths + [Path(r["path"]) for r in gen])]
        labels = [f"real {p.stem}" for p in real_paths]
        labels += [(f"cls {r['pres']:.2f}" if r["prompt_index"] == "class" else
                    f"p{r['prompt_index']} {r['dino']:.2f}") for r in gen]
        # Real images fill the first row(s); the generated ones follow.
        cols = max(len(real_paths), 8)
        pad = (-len(real_paths)) % cols
        blank = tiles[0].copy()
        blank.paste((255, 255, 255), (0, 0, size, size))
        tiles = tiles[: len(real_paths)] + [blank] * pad + tiles[len(real_paths):]
        labels = labels[: len(real_paths)] + [""] * pad + labels[len(real_paths):]
        image_grid(tiles, cols=cols, labels=labels).save(eval_dir / "contact_sheets" / f"{subject}.png")


def write_csv(path: Path, records: list[dict]) -> None:
    import io

    cols = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(records)
    atomic_write_text(path, buf.getvalue())


def log_wandb(eval_dir: Path, cfg: DictConfig, result: dict, records: list[dict], name: str) -> None:
    import wandb  # optional: only when eval.wandb=true

    run = wandb.init(project=cfg.eval.wandb_project, mode="offline", dir=str(eval_dir), job_type="evaluate",
                     name=name, config={"protocol": result["protocol"]})
    try:
        cols = ["subject", "prompt_index", "image_index", "prompt", "image", "dino", "clip_i", "clip_t", "pres"]
        table = wandb.Table(columns=cols)
        for r in records:
            table.add_data(r["subject"], str(r["prompt_index"]), r["image_index"], r.get("prompt"),
                           wandb.Image(r["path"]), r.get("dino"), r.get("clip_i"), r.get("clip_t"), r.get("pres"))
        run.log({"eval/images": table, **{k: v for k, v in result["summary"].items() if isinstance(v, float)}})
    finally:
        run.finish()


def write_outputs(out_dir: Path, mode: str, ms: MetricSet, records: list[dict], per_prompt: list[dict],
                  scorer: Scorer, cfg: DictConfig, root: Path | None, generation: Any = None,
                  real: Mapping[str, Sequence[Path]] | None = None, contact_sheets: bool = True) -> dict:
    eval_dir = out_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    metrics = summarise(ms, mode, scorer, cfg.eval.bootstrap)
    real = real or {}
    counts = {"subjects": len({r["subject"] for r in records}),
              "generated": sum(r["prompt_index"] not in ("real", "class") for r in records),
              "class": sum(r["prompt_index"] == "class" for r in records),
              "real": sum(len(v) for v in real.values())}
    result = {
        "mode": mode,
        # Flat `stage/name` keys for analysis/ and sweeps; a string says why a number is absent.
        "summary": {f"eval/{k}": (v["mean"] if isinstance(v, dict) else v) for k, v in metrics.items()},
        "metrics": metrics,
        "per_subject": {s: {k: v["per_subject"][s] for k, v in metrics.items()
                            if isinstance(v, dict) and s in v["per_subject"]}
                        for s in dict.fromkeys(r["subject"] for r in records)},
        "per_prompt": per_prompt,
        "protocol": protocol_card(mode, scorer, cfg, root, counts, generation),
    }
    atomic_write_json(eval_dir / "metrics.json", result)
    write_csv(eval_dir / "scores.csv", records)
    if contact_sheets and cfg.eval.contact_sheet:
        write_contact_sheets(eval_dir, records, real, int(cfg.eval.thumb))
    if cfg.eval.wandb:
        log_wandb(eval_dir, cfg, result, records, name=f"eval-{out_dir.name}")
    log.info("%s: %s", eval_dir / "metrics.json",
             ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result["summary"].items()))
    return result


# ---------------------------------------------------------------------------------------------------- modes

def _subject_names(root: Path) -> list[str]:
    return list(db.load_index(root).classes)


def score_sets(sets: Sequence[ImageSet], scorer: Scorer, subjects: Sequence[str], progress: bool = True
               ) -> tuple[MetricSet, list[dict], list[dict], dict[str, list[Path]]]:
    ms = MetricSet(subjects)
    records, per_prompt, real = [], [], {}
    for s in tqdm(sets, desc="scoring", unit="subject", disable=not progress, leave=False):
        r, p = scorer.score_set(s, ms)
        records += r
        per_prompt += p
        real[s.subject] = scorer.real(s.real_folder)["paths"]
    return ms, records, per_prompt, real


def evaluate_real(cfg: DictConfig, scorer: Scorer, root: Path) -> dict:
    names = list(cfg.subjects) if cfg.subjects else _subject_names(root)
    subjects = [dreambench_subject(root, n) for n in names]
    ms = MetricSet(_subject_names(root))
    records: list[dict] = []
    for s in tqdm(subjects, desc="real images", unit="subject", disable=not cfg.eval.progress, leave=False):
        records += scorer.score_real(s.name, s.folder, ms)
    real = {s.name: scorer.real(s.folder)["paths"] for s in subjects}
    out = Path(cfg.out_dir or Path("experiments") / "real-images")
    return write_outputs(out, "real", ms, records, [], scorer, cfg, root, real=real)


def evaluate_folder(cfg: DictConfig, scorer: Scorer, root: Path) -> dict:
    if not cfg.folder:
        raise EvalInputError("mode=folder needs folder=<path>")
    folder = Path(cfg.folder).expanduser()
    sets, manifest = folder_image_sets(folder, root, cfg.eval, list(cfg.subjects) if cfg.subjects else None)
    subjects = list(dict.fromkeys(_subject_names(root) + [s.subject for s in sets]))
    ms, records, per_prompt, real = score_sets(sets, scorer, subjects, cfg.eval.progress)
    out = Path(cfg.out_dir).expanduser() if cfg.out_dir else folder
    return write_outputs(out, "folder", ms, records, per_prompt, scorer, cfg, root,
                         generation=manifest.get("generation"), real=real)


def evaluate_runs(cfg: DictConfig, scorer: Scorer, root: Path) -> dict:
    runs = expand_runs(OmegaConf.to_container(cfg.runs) if not isinstance(cfg.runs, str) else cfg.runs)
    run_cfgs = {}
    for run in runs:  # read every config first: a broken run fails before hours of sampling
        try:
            rc = OmegaConf.load(run / "config.yaml")
            for key in ("data.subject", "data.class_noun", "data.live", "guidance.scheduler"):
                if OmegaConf.select(rc, key, throw_on_missing=True) is None:
                    raise EvalInputError(f"{run / 'config.yaml'}: no {key}")
        except EvalInputError:
            raise
        except Exception as e:  # noqa: BLE001 - YAML errors, missing values
            raise EvalInputError(f"{run / 'config.yaml'}: {one_line(e)}") from None
        real_folder_of(rc, root)  # unknown subject -> clear message now
        run_cfgs[run] = rc
    subjects = list(dict.fromkeys(_subject_names(root) + [str(rc.data.subject) for rc in run_cfgs.values()]))
    combined = MetricSet(subjects)
    all_records, all_prompts, all_real, results = [], [], {}, {}
    for run, rc in run_cfgs.items():
        identifier = str(rc.data.get("identifier") or "")
        if (run / "metrics.json").is_file():
            # The trainer records the identifier it actually used ("rare" in the config picks one).
            identifier = json.loads((run / "metrics.json").read_text()).get("identifier") or identifier
        images_dir = generate_run_images(run, rc, identifier, root, cfg)
        sets, manifest = folder_image_sets(images_dir, root, cfg.eval, [str(rc.data.subject)])
        ms, records, per_prompt, real = score_sets(sets, scorer, subjects, cfg.eval.progress)
        results[str(run)] = write_outputs(run, "run", ms, records, per_prompt, scorer, cfg, root,
                                          generation=manifest.get("generation"), real=real)
        write_card(run)  # the model card carries the scores just computed
        combined.merge(ms)
        all_records += [{"run": str(run), **r} for r in records]
        all_prompts += [{"run": str(run), **p} for p in per_prompt]
        all_real |= real
    if len(runs) == 1:
        return results[str(runs[0])]
    run_subjects = [str(rc.data.subject) for rc in run_cfgs.values()]
    if len(set(run_subjects)) != len(run_subjects):
        # Two runs of one subject would pool into one per-subject value: score them as separate tables.
        log.warning("several runs share a subject; per-run metrics written, no combined table")
        return {"runs": results}
    out = Path(cfg.out_dir).expanduser() if cfg.out_dir else _common_parent(runs)
    combined_result = write_outputs(out, "run", combined, all_records, all_prompts, scorer, cfg, root,
                                    generation={str(r): results[str(r)]["protocol"]["generation"] for r in runs},
                                    real=all_real, contact_sheets=False)
    return {**combined_result, "runs": list(results)}


def _common_parent(paths: Sequence[Path]) -> Path:
    import os

    return Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))


def _from_runs(cfg: DictConfig) -> None:
    """mode=run: the data set the runs were trained on when none is given (a toy-world run needs no
    DREAMBENCH_DATA), and a warning when the runs were monitored with other encoders than these."""
    runs = expand_runs(OmegaConf.to_container(cfg.runs) if not isinstance(cfg.runs, str) else cfg.runs)
    cfgs = []
    for r in runs:
        try:
            cfgs.append(OmegaConf.load(r / "config.yaml"))
        except Exception:  # noqa: BLE001, S112 - evaluate_runs reports a broken config.yaml, in one line
            continue
    if cfg.paths.dataset_dir is None:
        dirs = {str(d) for rc in cfgs if (d := OmegaConf.select(rc, "paths.dataset_dir", default=None))}
        if len(dirs) == 1:
            cfg.paths.dataset_dir = dirs.pop()
            log.info("data set: %s (the runs' paths.dataset_dir)", cfg.paths.dataset_dir)
    ours = OmegaConf.select(cfg, "metrics.dino.name_or_path", default=None)
    theirs = {str(d) for rc in cfgs if (d := OmegaConf.select(rc, "metrics.dino.name_or_path", default=None))}
    if theirs and ours is not None and str(ours) not in theirs:
        log.warning("the runs were configured with metrics.dino=%s, this evaluation uses %s (choose the same "
                    "metrics group, e.g. metrics=toy for a toy-world run)", ", ".join(sorted(theirs)), ours)


MODES = {"real": evaluate_real, "folder": evaluate_folder, "run": evaluate_runs}


def evaluate(cfg: DictConfig) -> dict:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise EvalInputError(f"missing config value(s): {', '.join(missing)} (mode is one of {', '.join(MODES)})")
    if cfg.mode not in MODES:
        raise EvalInputError(f"mode={cfg.mode!r}: choose one of {', '.join(MODES)}")
    if cfg.mode == "run":
        _from_runs(cfg)
    root = dataset_root(cfg)
    try:
        scorer = build_scorer(cfg.metrics)
    except (OSError, ValueError) as e:
        raise EvalInputError(f"cannot load the metric encoders: {one_line(e)} (hub ids or local folders: "
                             f"docs/EVALUATION.md)") from None
    return MODES[cfg.mode](cfg, scorer, root)


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    library_progress_bars(bool(cfg.eval.progress))
    try:
        result = evaluate(cfg)
    except EvalInputError as e:
        sys.exit(f"dreambench.evaluate: error: {e}")
    return result.get("summary")


if __name__ == "__main__":
    from dreambench.cli import run
    run(main)
