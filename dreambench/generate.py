"""`python -m dreambench.generate run=<run folder> prompts='["a {identifier} {class_noun} on the beach"]'`

Samples any prompts from a run's `model/` (or any diffusers folder) with the `guidance` group; writes the
images and a grid to `<run>/generated/<time>/`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dreambench.errors import UserError


def load_run(run: Path) -> tuple[Path, dict]:
    """(model folder, facts about the run: identifier, class noun, resolution) for a run or a model folder."""
    if (run / "model" / "model_index.json").is_file():
        model = run / "model"
    elif (run / "model_index.json").is_file():
        model, run = run, run.parent
    else:
        raise UserError(f"run={run}: no model/ folder (diffusers format) there")
    facts: dict = {}
    if (run / "config.yaml").is_file():
        c = OmegaConf.load(run / "config.yaml")
        facts = {"identifier": c.data.identifier, "class_noun": c.data.class_noun, "resolution": c.data.resolution}
    if (run / "metrics.json").is_file():
        facts["identifier"] = json.loads((run / "metrics.json").read_text()).get("identifier", facts.get("identifier"))
    return model, facts


def generate_from_run(cfg: DictConfig) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline

    from dreambench.sampling import generate, image_grid, make_scheduler

    run = Path(cfg.run).expanduser()
    model, facts = load_run(run)
    prompts = [p.format(identifier=facts.get("identifier", ""), class_noun=facts.get("class_noun", ""))
               for p in cfg.prompts]
    prompts = [" ".join(p.split()) for p in prompts]
    guidance = OmegaConf.to_container(cfg.guidance, resolve=True)
    guidance["height"] = guidance.get("height") or facts.get("resolution")
    guidance["width"] = guidance.get("width") or facts.get("resolution")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = StableDiffusionPipeline.from_pretrained(model, use_safetensors=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = make_scheduler(guidance["scheduler"], pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    n = int(cfg.num_images)
    jobs = [(p, int(cfg.seed) + k) for p in prompts for k in range(n)]
    images = generate(pipe, [p for p, _ in jobs], [s for _, s in jobs], guidance, int(cfg.batch_size),
                      progress=bool(cfg.progress), desc="generate")
    out = Path(cfg.out) if cfg.out else run / "generated" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    for i, ((p, s), im) in enumerate(zip(jobs, images)):
        im.save(out / f"{i:04d}_seed{s}.png")
    image_grid(images, cols=n, labels=[p for p, _ in jobs]).save(out / "grid.png")
    (out / "prompts.json").write_text(json.dumps([{"file": f"{i:04d}_seed{s}.png", "prompt": p, "seed": s}
                                                  for i, (p, s) in enumerate(jobs)], indent=2))
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        out = generate_from_run(cfg)
    except UserError as e:
        print(f"dreambench: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"dreambench: images in {out}")


if __name__ == "__main__":
    main()
