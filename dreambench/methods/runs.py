"""Loading any method's run back as a pipeline: `<run>/model/` holds the method's artefact (a whole diffusers
pipeline for dreambooth; LoRA weights or a learned embedding for lora / textual_inversion) and, for the
latter, `method.json` naming the base model and the artefact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

METHOD_FILE = "method.json"


def write_method_json(folder: Path, run_cfg: DictConfig, info: dict[str, Any]) -> None:
    from dreambench.utils.io import atomic_write_json

    m = run_cfg.model
    base = {
        k: OmegaConf.select(m, k)
        for k in ("pretrained", "family", "revision", "variant", "prediction_type", "build_tiny",
                  "single_file_config", "zero_terminal_snr")
    }
    atomic_write_json(Path(folder) / METHOD_FILE, {**info, "base_model": base})


def read_method_json(model_dir: Path) -> dict[str, Any] | None:
    f = Path(model_dir) / METHOD_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def load_base_pipeline(base: dict[str, Any]):
    from dreambench.models.families import get_family
    from dreambench.models.loading import (
        default_cache_dir,
        is_single_file,
        load_single_file_pipeline,
        resolve_model_ref,
        tiny_build_allowed,
    )
    from dreambench.models.tiny import is_built

    # model=tiny is rebuilt (seeded, identical) where its cache folder is gone; a run trained under another
    # cache (another machine, DREAMBENCH_CACHE) gets it rebuilt in today's cache, never at the recorded path.
    base = dict(base)
    family = get_family(base.get("family"))  # absent in runs made before model families: SD
    if base.get("build_tiny") and not is_built(Path(str(base["pretrained"])).expanduser(), family.name) \
            and not tiny_build_allowed(base["pretrained"], None):
        base["pretrained"] = str(default_cache_dir() / Path(str(base["pretrained"])).name)
    ref = resolve_model_ref(OmegaConf.create(base))
    if is_single_file(ref):  # trained on a single-file base model (model.pretrained=<file>.safetensors)
        pipe = load_single_file_pipeline(ref, base.get("single_file_config"), family=family.name)
    else:
        pipe = family.load_pipeline(ref, revision=base.get("revision"), variant=base.get("variant"))
    if base.get("prediction_type"):  # as in training (e.g. sd21 768 px is v-prediction)
        pipe.scheduler = pipe.scheduler.__class__.from_config(
            pipe.scheduler.config, prediction_type=base["prediction_type"]
        )
    if base.get("zero_terminal_snr"):  # the schedule the adapter / embedding was trained and sampled with
        from dreambench.models.loading import ZERO_SNR_SAMPLER
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, **ZERO_SNR_SAMPLER)
    return pipe


def load_pipeline_folder(folder: str | Path):
    """A whole diffusers pipeline folder (a dreambooth run's model/) with its family's pipeline class, read from
    its model_index.json."""
    from dreambench.models.families import folder_family, get_family

    return get_family(folder_family(folder) or "sd").load_pipeline(str(folder))


def load_run_pipeline(run_dir: str | Path):
    """The tuned model of any method's run as its family's pipeline (`StableDiffusionPipeline`,
    `StableDiffusionXLPipeline`; on CPU, fp32; progress bar off)."""
    from dreambench.methods import METHODS

    model_dir = Path(run_dir) / "model"
    info = read_method_json(model_dir)
    if info is None:
        if not (model_dir / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{run_dir}: no exported model ({model_dir} has neither model_index.json nor {METHOD_FILE})"
            )
        pipe = load_pipeline_folder(model_dir)
    else:
        cls = METHODS.get(info.get("method"))
        if cls is None:
            raise ValueError(
                f"{model_dir / METHOD_FILE}: unknown method {info.get('method')!r} "
                f"(known: {', '.join(METHODS)})"
            )
        pipe = load_base_pipeline(info["base_model"])
        cls.load_artefact(pipe, model_dir, info)
    pipe.set_progress_bar_config(disable=True)
    return with_run_call_kwargs(pipe, Path(run_dir))


def with_run_call_kwargs(pipe, run_dir: Path):
    """The run's family settings that sampling must repeat (SD3: model.max_sequence_length), from its config."""
    from omegaconf import OmegaConf

    from dreambench.models.families import BY_PIPELINE, get_family
    cfg_file = run_dir / "config.yaml"
    family = get_family(BY_PIPELINE.get(type(pipe).__name__, "sd"))
    if cfg_file.is_file():
        model_cfg = OmegaConf.load(cfg_file).get("model") or {}
        family = family.configured(OmegaConf.create(dict(model_cfg)), pipe.components.get("transformer")
                                   or pipe.components.get("unet"))
    return family.with_call_kwargs(pipe)
