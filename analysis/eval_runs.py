"""`python -m analysis.eval_runs <dreambench.evaluate overrides>`: `python -m dreambench.evaluate mode=run` for runs
of every method (dreambooth, lora, textual_inversion).

dreambench.evaluate loads `<run>/model/` as a whole diffusers pipeline, which only dreambooth runs export. Until
it calls `dreambench.methods.load_run_pipeline`, this entry point runs the very same evaluation with the image
generation of a run going through that function: same prompts, seeds, layout (`<run>/eval/images/`), manifest,
scoring and outputs. Same config (conf/evaluate.yaml) and overrides, e.g.

    python -m analysis.eval_runs mode=run 'runs=[experiments/table1/textual_inversion]' metrics=tiny
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dreambench import evaluate as ev

log = logging.getLogger("dreambench.evaluate")
_original = ev.generate_run_images


def generate_run_images(run: Path, run_cfg: DictConfig, identifier: str, root: Path, cfg: DictConfig) -> Path:
    """dreambench.evaluate.generate_run_images for runs whose model/ is an adapter or an embedding."""
    if (run / "model" / "model_index.json").is_file():  # a whole pipeline: evaluate's own code
        return _original(run, run_cfg, identifier, root, cfg)
    import torch

    from dreambench.methods import load_run_pipeline
    from dreambench.methods.runs import METHOD_FILE
    from dreambench.sampling import generate, make_scheduler
    from dreambench.utils.io import atomic_write_json

    data, e = run_cfg.data, cfg.eval
    subject, class_noun, live = str(data.subject), str(data.class_noun), bool(data.live)
    prompts = ev.subject_prompts(root, live, identifier, class_noun)
    if e.prompts_limit:
        prompts = prompts[: int(e.prompts_limit)]
    g = OmegaConf.to_container(run_cfg.guidance, resolve=True)
    guidance = {
        k: g.get(k)
        for k in ("scheduler", "num_inference_steps", "guidance_scale", "negative_prompt", "height", "width")
    }
    if e.num_inference_steps:
        guidance["num_inference_steps"] = int(e.num_inference_steps)
    n, n_cls = int(e.images_per_prompt), int(e.pres_images)
    class_prompt = f"a {class_noun}"
    model_dir = run / "model"
    if not (model_dir / METHOD_FILE).is_file():
        raise ev.EvalInputError(
            f"{run}: no exported model ({model_dir} has neither model_index.json nor {METHOD_FILE})"
        )
    generation = {
        "model": str(model_dir),
        "model_files": ev._model_fingerprint(model_dir),
        "guidance": guidance,
        "method": json.loads((model_dir / METHOD_FILE).read_text()),
        "images_per_prompt": n,
        "prompts_limit": e.prompts_limit,
        "n_prompts": len(prompts),
        "seed": int(e.seed),
        "seed_rule": "seed + 1000 * prompt_index + image_index; class image k: "
        f"seed + {ev.CLASS_SEED_OFFSET} + k",
        "class_prompt": class_prompt,
        "class_images": n_cls,
    }
    out = run / "eval" / "images"
    sub = out / subject
    names = [f"{p:02d}_{k}.png" for p in range(len(prompts)) for k in range(n)]
    cls_names = [f"class_{k:02d}.png" for k in range(n_cls)]
    old = json.loads((out / ev.MANIFEST).read_text()) if (out / ev.MANIFEST).is_file() else {}
    if (
        not e.regenerate
        and old.get("generation") == generation
        and all((sub / f).is_file() for f in names + cls_names)
    ):
        log.info("%s: reusing %d generated images", run, len(names) + len(cls_names))
        return out
    try:
        pipe = load_run_pipeline(run)
    except (OSError, ValueError) as err:
        raise ev.EvalInputError(f"{run}: cannot load its model: {ev.one_line(err)}") from None
    pipe.scheduler = make_scheduler(guidance["scheduler"], pipe.scheduler.config)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    sub.mkdir(parents=True, exist_ok=True)
    seeds = {f"{p:02d}_{k}.png": ev.image_seed(e.seed, p, k) for p in range(len(prompts)) for k in range(n)}
    seeds |= {f"class_{k:02d}.png": int(e.seed) + ev.CLASS_SEED_OFFSET + k for k in range(n_cls)}
    all_prompts = [prompts[p] for p in range(len(prompts)) for _ in range(n)] + [class_prompt] * n_cls
    images = generate(
        pipe,
        all_prompts,
        [seeds[f] for f in names + cls_names],
        guidance,
        batch_size=int(e.batch_size),
        progress=bool(e.progress),
        desc=f"eval {subject}",
    )
    for name, im in zip(names + cls_names, images):
        im.save(sub / name)
    manifest = {
        "identifier": identifier,
        "generation": generation,
        "subjects": {
            subject: {
                "class_noun": class_noun,
                "live": live,
                "identifier": identifier,
                "prompts": prompts,
                "class_prompt": class_prompt,
                "seeds": seeds,
                "real_folder": str(ev.real_folder_of(run_cfg, root)),
            }
        },
    }
    atomic_write_json(out / ev.MANIFEST, manifest)
    return out


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig):
    ev.generate_run_images = generate_run_images  # evaluate_runs looks it up in its module at call time
    try:
        result = ev.evaluate(cfg)
    except ev.EvalInputError as err:
        sys.exit(f"dreambench.evaluate: error: {err}")
    return result.get("summary")


if __name__ == "__main__":
    main()
