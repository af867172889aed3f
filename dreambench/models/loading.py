"""Load Stable Diffusion components by hub id or local diffusers folder, safetensors only."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger("dreambench")


class ModelNotFoundError(FileNotFoundError):
    pass


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # the training-time forward process
    scheduler_config: dict[str, Any]  # the base model's own scheduler config, for sampling schedulers
    identity: dict[str, Any]  # what identifies the base model (class-image cache key)
    family: str = "sd"  # dreambench.models.families: what differs between model generations
    text_encoder_2: Any = None  # SDXL's / SD3's second text encoder (CLIPTextModelWithProjection), its tokenizer
    tokenizer_2: Any = None
    text_encoder_3: Any = None  # SD3's T5 (None with model.t5=false) and its tokenizer
    tokenizer_3: Any = None

    def parts(self) -> dict[str, Any]:
        """The pipeline components by their diffusers names (those the family has)."""
        return {k: v for k, v in (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder),
                                  ("tokenizer", self.tokenizer), ("text_encoder_2", self.text_encoder_2),
                                  ("tokenizer_2", self.tokenizer_2), ("text_encoder_3", self.text_encoder_3),
                                  ("tokenizer_3", self.tokenizer_3)) if v is not None}


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists()


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # one-file checkpoints in the original (CompVis) layout


def is_single_file(ref: str) -> bool:
    return str(ref).endswith(SINGLE_FILE_SUFFIXES)


def config_source(ref: str, single_file_config: str | None) -> str:
    """Where the model's configs (unet/, vae/, text_encoder/, tokenizer/) are: the model itself, or for a
    single-file checkpoint the folder or hub id given with it."""
    return (single_file_config or ref) if is_single_file(ref) else ref


def load_single_file_pipeline(ref: str, single_file_config: str | None = None, allow_pickle: bool = False,
                              family: str = "sd"):
    """A single-file checkpoint through diffusers' `from_single_file` of the family's pipeline class. With
    `single_file_config` (a local diffusers folder) nothing is fetched: without it diffusers infers the model type
    from the keys and fetches that type's configs from the Hub (or its local cache), which fails offline."""
    import diffusers

    from dreambench.models.families import get_family
    fam = get_family(family)
    pipeline_cls = getattr(diffusers, fam.pipeline_class)
    extra = {"safety_checker": None, "requires_safety_checker": False} if fam.name == "sd" else {}

    if ref.endswith(".ckpt") and not allow_pickle:
        raise ModelNotFoundError(f"model.pretrained={ref}: a .ckpt is a pickle file that can run code; use a "
                                 f".safetensors checkpoint or model.allow_pickle=true for a file you trust")
    kw = {"config": str(Path(single_file_config).expanduser()) if _looks_local(single_file_config)
          else single_file_config} if single_file_config else {}
    try:
        return pipeline_cls.from_single_file(str(Path(ref).expanduser()), **extra, **kw)
    except (OSError, ValueError, EnvironmentError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise ModelNotFoundError(f"could not load single-file model {ref}: {msg} (model.single_file_config=<a "
                                 f"diffusers folder of the same architecture> gives diffusers its configs)") from None


def check_model_ref(ref: str, revision: str | None = None, single_file_config: str | None = None,
                    allow_pickle: bool = True) -> None:
    """Fail fast, before anything heavy is loaded, on a model that is not there (or, with allow_pickle=False, a
    local folder whose weights are pickle files only)."""
    if not ref:
        raise ModelNotFoundError("model.pretrained is empty: give a hub id or a local diffusers folder")
    if is_single_file(ref):
        if not Path(ref).expanduser().is_file():
            raise ModelNotFoundError(f"model.pretrained={ref}: no such checkpoint file")
        if single_file_config:
            check_model_ref(single_file_config, revision)
        return
    if _looks_local(ref):
        p = Path(ref).expanduser()
        if not (p / "model_index.json").is_file() and not (p / "unet" / "config.json").is_file():
            raise ModelNotFoundError(f"model.pretrained={ref}: no diffusers model folder there "
                                     f"(expected model_index.json and unet/, vae/, text_encoder/, tokenizer/)")
        if not allow_pickle:
            pickled = [d for d in ("unet", "vae", "text_encoder") if (p / d).is_dir()
                       and not any((p / d).glob("*.safetensors")) and any((p / d).glob("*.bin"))]
            if pickled:
                raise ModelNotFoundError(
                    f"model.pretrained={ref}: {', '.join(pickled)} hold only pickle weights (.bin), which can run "
                    f"code when loaded; convert them to safetensors, or set model.allow_pickle=true for a model "
                    f"you trust")
        return
    why = _hub_file(ref, "model_index.json", revision)  # a few KB: fails now instead of mid-run
    if why:
        raise ModelNotFoundError(f"model.pretrained={ref}: {why}; download it once or point model.pretrained at "
                                 f"a local diffusers folder")


def reachable(ref: str, filename: str) -> str | None:
    """None when `ref` is a local folder holding `filename` or a hub repo whose `filename` is cached or can be
    downloaded (a few KB); else why not, in a few words."""
    if _looks_local(ref):
        p = Path(ref).expanduser()
        return None if (p / filename).is_file() else f"no {filename} in that folder"
    return _hub_file(ref, filename)


def _hub_file(ref: str, filename: str, revision: str | None = None) -> str | None:
    """None when `filename` of hub repo `ref` is in the local cache or downloads; else why not. Without a
    network the answer comes at once: huggingface_hub would retry five times, about 30 s, printing each."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    cached = try_to_load_from_cache(ref, filename, revision=revision)
    if isinstance(cached, str):
        return None
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if constants.HF_HUB_OFFLINE:
        return "not in the local cache, and HF_HUB_OFFLINE is set"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"not in the local cache, and {host} cannot be reached (no network?)"
    try:
        hf_hub_download(ref, filename, revision=revision)
    except Exception as e:  # noqa: BLE001
        return f"cannot reach it on the hub nor in the local cache ({e.__class__.__name__})"
    return None


def model_identity(ref: str, revision: str | None, variant: str | None) -> dict[str, Any]:
    """What must change when the base model changes: the hub id + revision, or, for a local folder, a digest
    of its configs and of the size and mtime of its weight files (hashing gigabytes would cost minutes)."""
    ident: dict[str, Any] = {"ref": ref, "revision": revision, "variant": variant}
    if _looks_local(ref) and Path(ref).expanduser().is_file():  # a single-file checkpoint
        st = Path(ref).expanduser().resolve().stat()
        ident["ref"] = str(Path(ref).expanduser().resolve())
        ident["digest"] = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    elif _looks_local(ref):
        root = Path(ref).expanduser().resolve()
        h = hashlib.sha256()
        for f in sorted(root.rglob("*")):
            if f.is_file():
                rel = f.relative_to(root).as_posix()
                if f.suffix == ".json" or f.name.endswith((".txt",)):
                    h.update(rel.encode() + f.read_bytes())
                else:
                    st = f.stat()
                    h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
        ident["ref"] = str(root)
        ident["digest"] = h.hexdigest()
    return ident


def check_family(ref: str, family: str) -> None:
    """A local diffusers folder says which pipeline it is: refuse a mismatch with model.family before loading."""
    from dreambench.models.families import FAMILIES, folder_family
    if is_single_file(ref) or not _looks_local(ref):
        return
    found = folder_family(ref)
    if found is not None and found != family:
        raise ModelNotFoundError(
            f"model.pretrained={ref} is a {FAMILIES[found].pipeline_class} (model.family={found}), but "
            f"model.family={family}: use a model config of that family (e.g. model={'sdxl' if found == 'sdxl' else 'sd15'})"
            f" or set model.family={found}")


def load_components(ref: str, revision: str | None = None, variant: str | None = None,
                    allow_pickle: bool = False, prediction_type: str | None = None,
                    single_file_config: str | None = None, family: str = "sd",
                    options: dict[str, Any] | None = None) -> Components:
    """`options`: the family's loading switches from `model.*` (SD3: t5)."""
    from dreambench.models.families import get_family
    fam = get_family(family)
    check_model_ref(ref, revision, single_file_config)
    check_family(ref, fam.name)
    if allow_pickle:
        log.warning("model.allow_pickle=true: pickle weight files may be loaded; they can run arbitrary code. "
                    "Use only files you trust.")
    st: bool | None = None if allow_pickle else True  # True: diffusers/transformers refuse non-safetensors
    if is_single_file(ref):
        pipe = load_single_file_pipeline(ref, single_file_config, allow_pickle, fam.name)
        parts = dict(pipe.components)
        if "transformer" in parts:  # SD3: the module keeps the denoiser as `unet` whatever it is
            parts["unet"] = parts.pop("transformer")
        sched_cfg = dict(pipe.scheduler.config)
    else:
        try:
            parts = fam.load_parts(ref, revision, variant, st, options)
            sched_cfg = dict(DDPMScheduler.load_config(ref, subfolder="scheduler", revision=revision))
        except (OSError, ValueError, EnvironmentError) as e:
            msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise ModelNotFoundError(f"could not load model {ref}: {msg}"
                                     + ("" if allow_pickle else " (only safetensors weights are loaded; "
                                        "model.allow_pickle=true accepts pickle files you trust)")) from None
    if prediction_type:  # e.g. sd21 at 768 px is a v-prediction model
        sched_cfg["prediction_type"] = prediction_type
    noise_scheduler = fam.training_scheduler(sched_cfg)
    return Components(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], noise_scheduler, sched_cfg,
                      model_identity(ref, revision, variant), family=fam.name,
                      text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"),
                      text_encoder_3=parts.get("text_encoder_3"), tokenizer_3=parts.get("tokenizer_3"))


ZERO_SNR_SAMPLER = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def with_zero_terminal_snr(components: Components) -> Components:
    """`model.zero_terminal_snr`: Lin et al. (WACV 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed"), §3.1-3.3. The betas are rescaled so that the last timestep has SNR 0 (pure noise, as sampling starts
    from) — diffusers' `rescale_zero_terminal_snr`, switched on through the schedulers' own
    `rescale_betas_zero_snr` — and samplers start at the last timestep (`timestep_spacing="trailing"`). Both go into
    the scheduler config the run samples, caches class images and exports with, so every sampler built from it
    (DDIM, DDPM, Euler, ...) and the exported model use the same schedule. Needs a v-prediction model: at SNR 0
    an epsilon model's input is its target and x0 cannot be recovered (§3.2)."""
    cfg = dict(components.scheduler_config)
    if cfg.get("prediction_type", "epsilon") != "v_prediction":
        from dreambench.errors import UserError
        raise UserError(f"model.zero_terminal_snr=true needs a v-prediction model (this one predicts "
                        f"{cfg.get('prediction_type', 'epsilon')}): set model.prediction_type=v_prediction, as "
                        f"Lin et al. 2024 §3.2 do, or leave zero_terminal_snr off")
    cfg.update(ZERO_SNR_SAMPLER)
    return dataclasses.replace(components, noise_scheduler=DDPMScheduler.from_config(cfg), scheduler_config=cfg)


def default_cache_dir() -> Path:
    """paths.cache_dir's default (conf/paths/default.yaml), for code that runs without a composed config."""
    return Path(os.environ.get("DREAMBENCH_CACHE") or Path(os.environ.get("HOME", ".")) / ".cache" / "dreambench")


def tiny_build_allowed(folder: str | Path, cache_dir: str | Path | None) -> bool:
    # A random model is built only inside the cache: a mistyped model.pretrained must not get one, where a later
    # real-model run with the same path would load it as Stable Diffusion. paths.cache_dir says where it may go.
    cache = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser().resolve()
    return Path(folder).expanduser().resolve().is_relative_to(cache)


def resolve_model_ref(model_cfg: Any, cache_dir: str | Path | None = None) -> str:
    """`model=tiny` builds its folder on first use, inside `cache_dir` (paths.cache_dir) only; every model is
    then loaded by the same code."""
    ref = str(model_cfg.pretrained)
    if model_cfg.get("build_tiny"):
        from dreambench.models.tiny import ensure_tiny_model, is_built
        family = str(model_cfg.get("family") or "sd")
        if not is_built(Path(ref).expanduser(), family) and not tiny_build_allowed(ref, cache_dir):
            raise ModelNotFoundError(
                f"model.pretrained={ref}: no tiny model there, and the tiny model is built only inside "
                f"paths.cache_dir ({Path(cache_dir or default_cache_dir()).expanduser()}): leave model.pretrained "
                f"at its default, or set paths.cache_dir to the folder it should be built in")
        ensure_tiny_model(ref, family=family)
    return ref


def describe(components: Components) -> str:
    n = sum(p.numel() for p in components.unet.parameters())
    target = components.noise_scheduler.config.get("prediction_type") or "flow matching"
    return (f"{type(components.unet).__name__} {n / 1e6:.1f} M params, prediction {target}, "
            f"latent scale {components.vae.config.scaling_factor}")
