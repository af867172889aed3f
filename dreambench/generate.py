"""`python -m dreambench.generate run=<run folder> prompts='["a {identifier} {class_noun} on the beach"]'`

Samples any prompts from a run of any method (or any diffusers folder) with the `guidance` group; writes the
images and a grid to `<run>/generated/<time>/`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dreambench.errors import UserError, exit_on_user_error
from dreambench.utils.logs import library_progress_bars


def find_run(run: Path) -> tuple[Path, Path | None]:
    """(run folder, bare model folder or None): a run of any method (its model/ holds a diffusers pipeline, or
    the method's artefact + method.json), or a diffusers model folder given directly. Cheap: nothing loads."""
    from dreambench.methods.runs import METHOD_FILE

    if (run / "model" / "model_index.json").is_file() or (run / "model" / METHOD_FILE).is_file():
        return run, None
    if (run / "model_index.json").is_file():
        return run.parent, run
    raise UserError(f"run={run}: no model/ folder there (a finished run with train.export_model=true, or a "
                    f"diffusers model folder)")


def _prompt_facts(run: Path) -> dict:
    """What prompts are filled with: identifier (as trained), class noun, resolution."""
    facts: dict = {}
    if (run / "config.yaml").is_file():
        c = OmegaConf.load(run / "config.yaml")
        facts = {"identifier": c.data.identifier, "class_noun": c.data.class_noun, "resolution": c.data.resolution}
    if (run / "metrics.json").is_file():
        facts["identifier"] = json.loads((run / "metrics.json").read_text()).get("identifier", facts.get("identifier"))
    return facts


def fill_prompts(prompts, facts: dict) -> list[str]:
    """The prompts with {identifier} / {class_noun} filled; one string is one prompt (not one per letter)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"prompts={prompts}: give a list of prompts, e.g. prompts='[\"a {{identifier}} "
                        f"{{class_noun}} in the snow\"]'")
    fields = {"identifier": facts.get("identifier", ""), "class_noun": facts.get("class_noun", "")}
    out = []
    for p in prompts:
        try:
            out.append(" ".join(p.format(**fields).split()))
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"prompt {p!r}: bad placeholder {e} (known: {{identifier}}, {{class_noun}}; "
                            f"double a brace for a literal one)") from None
    return out


def generate_from_run(cfg: DictConfig) -> Path:
    import torch

    from dreambench.methods import load_run_pipeline
    from dreambench.methods.runs import load_pipeline_folder, with_run_call_kwargs
    from dreambench.sampling import generate, image_grid, make_scheduler

    run, bare_model = find_run(Path(cfg.run).expanduser())
    facts = _prompt_facts(run)
    prompts = fill_prompts(OmegaConf.to_container(cfg.prompts) if OmegaConf.is_config(cfg.prompts) else cfg.prompts,
                           facts)
    for key in ("num_images", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise UserError(f"{key}={cfg[key]}: must be a whole number >= 1")
    guidance = OmegaConf.to_container(cfg.guidance, resolve=True)
    guidance["height"] = guidance.get("height") or facts.get("resolution")
    guidance["width"] = guidance.get("width") or facts.get("resolution")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if bare_model is None:  # any method's run: the same loader as evaluate (LoRA / embeddings on their base)
        pipe = load_run_pipeline(run)
    else:
        pipe = with_run_call_kwargs(load_pipeline_folder(bare_model), run)  # SD 3.5 / Flux: the run's T5 length
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
    library_progress_bars(bool(cfg.progress))
    with exit_on_user_error():
        out = generate_from_run(cfg)
    print(f"dreambench: images in {out}")


if __name__ == "__main__":
    from dreambench.cli import run
    run(main)
