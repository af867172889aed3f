"""The model card of a run: `<run>/README.md`, YAML front matter as the Hugging Face Hub reads it (base model,
licence, library, tags, instance prompt, and the DreamBench scores as `model-index` once evaluated) and a body
that says how to use each export. Written at the end of training, rewritten by `evaluate` (scores current) and
`export` (file list current); built from the run folder alone (DESIGN.md, point 9)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CARD = "README.md"
METRICS = ("dino", "clip_i", "clip_t", "pres", "div")  # the paper's Table 1 columns + PRES / DIV (§4.3)


def _load(run: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml")) if (run / "config.yaml").is_file() else {}
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    ev = run / "eval" / "metrics.json"
    return cfg, metrics, json.loads(ev.read_text()) if ev.is_file() else None


def _hub_id(ref: str | None) -> str | None:
    """A base model the Hub can link to: an `owner/name` id, not a local folder or file."""
    if not ref:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists() or "/" not in ref:
        return None
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return None
    return ref


def _files(run: Path) -> list[str]:
    return sorted(p.relative_to(run).as_posix() for d in ("model", "export") if (run / d).is_dir()
                  for p in (run / d).rglob("*") if p.is_file())


def _latest_grid(run: Path) -> str | None:
    """samples/before_after.png when the run wrote one (the first grid beside the last), else the latest grid."""
    if (run / "samples" / "before_after.png").is_file():
        return "samples/before_after.png"
    grids = sorted((run / "samples").glob("step_*.png")) if (run / "samples").is_dir() else []
    return grids[-1].relative_to(run).as_posix() if grids else None


def card_metadata(run: Path) -> dict[str, Any]:
    """The front matter, as plain data (ModelCardData's field names)."""
    cfg, metrics, ev = _load(run)
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    method = (metrics.get("method") or {}).get("name") or "dreambooth"
    identifier = metrics.get("identifier") or data.get("identifier")
    tags = ["text-to-image", "diffusers", "stable-diffusion", "dreambooth", "dreambench"]
    tags += {"lora": ["lora"], "textual_inversion": ["textual-inversion"]}.get(method, [])
    meta: dict[str, Any] = {
        "license": model.get("license"),
        "base_model": _hub_id(model.get("pretrained")),
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": tags,
        "instance_prompt": metrics.get("instance_prompt"),
        "trigger_words": [identifier] if identifier else None,
    }
    if ev and ev.get("mode") == "run":
        meta["model_name"] = f"dreambench-{data.get('subject', run.name)}-{method}"
        meta["eval_results"] = _eval_results(ev)
    return {k: v for k, v in meta.items() if v not in (None, [], "")}


def _eval_results(ev: dict[str, Any]) -> list:
    from huggingface_hub import EvalResult

    out = []
    for name in METRICS:
        m = (ev.get("metrics") or {}).get(name)
        if isinstance(m, dict):
            out.append(EvalResult(task_type="text-to-image", task_name="Subject-driven generation",
                                  dataset_type="google/dreambooth", dataset_name="DreamBench",
                                  metric_type=name, metric_name=name.upper().replace("_", "-"),
                                  metric_value=round(float(m["mean"]), 6)))
    return out


def _usage(run: Path, files: list[str], meta: dict[str, Any], method: str, base: str,
           pipeline: str = "StableDiffusionPipeline") -> list[str]:
    trigger = (meta.get("trigger_words") or ["sks"])[0]
    lines = ["## Use it", ""]
    if method == "dreambooth":
        lines += ["**diffusers**:", "```python", f"from diffusers import {pipeline}",
                  f'pipe = {pipeline}.from_pretrained("<this repo or folder>/model")', "```"]
    elif method == "lora":
        lines += ["**diffusers**:", "```python", f"from diffusers import {pipeline}",
                  f'pipe = {pipeline}.from_pretrained("{base}")',
                  'pipe.load_lora_weights("<this repo or folder>/model")', "```"]
    else:
        lines += ["**diffusers**:", "```python", f"from diffusers import {pipeline}",
                  f'pipe = {pipeline}.from_pretrained("{base}")',
                  f'pipe.load_textual_inversion("<this repo or folder>/model", token="{trigger}")', "```"]
    lines.append("")
    for f in files:
        name = Path(f).name
        if f.startswith("export/single_file/"):
            lines += [f"**ComfyUI / A1111 / Forge / InvokeAI** checkpoint: copy `{f}` to `models/checkpoints/` "
                      f"(ComfyUI) or `models/Stable-diffusion/` (A1111); diffusers: "
                      f"`StableDiffusionPipeline.from_single_file(\"{f}\", config=\"{base}\")`."]
        elif f.startswith("export/kohya/"):
            lines += [f"**ComfyUI / A1111** LoRA: copy `{f}` to `models/loras/` (ComfyUI: LoraLoader) or "
                      f"`models/Lora/` (A1111: `<lora:{Path(name).stem}:1>` in the prompt)."]
        elif f.startswith("export/a1111/"):
            lines += [f"**A1111 / ComfyUI** embedding: copy `{f}` to `embeddings/`; write "
                      f"`{Path(name).stem}` (A1111) or `embedding:{Path(name).stem}` (ComfyUI) in the prompt "
                      f"where the training prompts had `{trigger}`."]
        else:
            continue
        lines.append("")
    return lines


def card_text(run: Path) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    cfg, metrics, ev = _load(run)
    meta = card_metadata(run)
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    method = (metrics.get("method") or {}).get("name") or "dreambooth"
    base = str(model.get("pretrained") or "<base model>")
    files = _files(run)
    subject = data.get("subject", run.name)
    body = [f"# {subject}: {method} on {model.get('name', base)}", "",
            f"Trained with dreambench ({method}; DreamBooth: Ruiz et al., CVPR 2023) on "
            f"{metrics.get('num_instance_images', '?')} photos of one {data.get('class_noun', 'subject')}. "
            f"Base model: `{base}`" + (f" (licence: {model['license']})." if model.get("license") else "."), "",
            f"- instance prompt: `{metrics.get('instance_prompt', '')}`; trigger word: "
            f"`{(meta.get('trigger_words') or ['?'])[0]}`",
            f"- class prompt: `{metrics.get('class_prompt', '')}`", ""]
    grid = _latest_grid(run)
    if grid:
        body += [f"![samples]({grid})", "",
                 "Fixed-seed samples: the instance prompt, two contexts and the bare class prompt"
                 + (", before and after training." if grid.endswith("before_after.png") else "."), ""]
    from dreambench.models.families import get_family
    body += _usage(run, files, meta, method, base, get_family(model.get("family")).pipeline_class)
    body += ["## Training", "", "| setting | value |", "|---|---|"]
    opt, prior, train = cfg.get("optimizer") or {}, cfg.get("prior") or {}, cfg.get("trainer") or {}
    settings = dict(metrics.get("method") or {})  # the method's summary(): name and its own settings
    settings.pop("name", None)
    loss = metrics.get("train/loss")
    rows = {"method": method + (f" ({', '.join(f'{k}={v}' for k, v in settings.items())})" if settings else ""),
            # LoRA trains at its own method.lr, not optimizer.lr
            "steps": metrics.get("steps", train.get("max_steps")), "learning rate": settings.get("lr", opt.get("lr")),
            "prior preservation λ": (metrics.get("prior") or {}).get("weight", prior.get("weight")),
            "resolution": data.get("resolution"), "batch size": data.get("batch_size"),
            "precision": train.get("precision"), "seed": cfg.get("seed"),
            "final loss": f"{loss:.4g}" if isinstance(loss, float) else loss}
    body += [f"| {k} | {v} |" for k, v in rows.items() if v is not None] + [""]
    if ev:
        body += ["## DreamBench scores", "", "| metric | mean | 95% interval (bootstrap over subjects) |",
                 "|---|---|---|"]
        for name in METRICS:
            m = (ev.get("metrics") or {}).get(name)
            if isinstance(m, dict):
                lo, hi = m.get("ci95") or [None, None]
                body.append(f"| {name} | {m['mean']:.4f} | " + (f"[{lo:.4f}, {hi:.4f}]" if lo is not None else "")
                            + " |")
            elif m is not None:
                body.append(f"| {name} | {m} | |")
        body += ["", "<details><summary>Protocol card</summary>", "", "```json",
                 json.dumps(ev.get("protocol"), indent=2, default=str), "```", "", "</details>", ""]
    if files:
        body += ["## Files", ""] + [f"- `{f}`" for f in files] + [""]
    card = ModelCard.from_template(ModelCardData(**meta), template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n",
                                   body="\n".join(body))
    return str(card)


def write_card(run: str | Path) -> Path:
    from dreambench.utils.io import atomic_write_text

    run = Path(run)
    atomic_write_text(run / CARD, card_text(run))
    return run / CARD
