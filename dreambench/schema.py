"""Typed config schemas and start-up validation: every problem of a composed config in one UserError line,
before any model loads, each naming its key.

Hydra's struct mode already rejects an unknown key given on the command line, but not one inside a config file
merged through the defaults list (an experiment file's `data: {subjct: dog}` is silently kept and never read).
So the composed config is checked here against:
- the dataclass schemas below (types and allowed values of the core groups),
- the keys the group's own option files declare (conf/<group>/*.yaml): a key no option declares is unknown,
  which keeps this check in step with the config files without a second list to maintain,
- for `_target_` nodes (optimizer, prior, logger, method, trainer), the target's constructor signature.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dreambench.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
FORBIDDEN = {"trust_remote_code"}  # runs code shipped with a hub model: never reachable from a config


@dataclass
class DataSchema:
    subject: str = "???"
    class_noun: str = "???"
    live: bool = False
    instance_dir: str | None = None
    identifier: str = "sks"
    instance_prompt: str = "a {identifier} {class_noun}"
    class_prompt: str = "a {class_noun}"
    resolution: int = 512
    center_crop: bool = True
    hflip: bool = False
    latents_cache_dir: str | None = None
    batch_size: int = 1
    on_bad_image: str = "error"
    min_size: int | None = None
    captions: bool = False
    caption_dropout: float = 0.0
    buckets: bool = False


@dataclass
class FlowSchema:
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"
    guidance: float = 3.5


@dataclass
class ModelSchema:
    name: str = "sd15"
    family: str = "sd"
    pretrained: str = "???"
    t5: bool = True
    max_sequence_length: int = 256
    flow: FlowSchema = field(default_factory=FlowSchema)
    revision: str | None = None
    variant: str | None = None
    resolution: int = 512
    prediction_type: str | None = None
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    allow_pickle: bool = False
    build_tiny: bool = False
    build_command: str | None = None
    license: str | None = None
    single_file_config: str | None = None
    vae_fp32: Any = "auto"
    zero_terminal_snr: bool = False


@dataclass
class EMASchema:
    enabled: bool = False
    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3
    every_n_steps: int = 1
    device: str = "same"


@dataclass
class ValLossSchema:
    every_n_steps: int = 0
    holdout: int = 0
    class_images: int = 0
    timesteps: int = 5
    seed: int = 0


@dataclass
class LossSchema:
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    mask: bool = False


@dataclass
class TrainSchema:
    sample_every_n_steps: int = 200
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1])
    sample_cache_dir: str | None = None
    checkpoint_every_n_steps: int = 200
    keep_checkpoints: int = 1
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    export_model: bool = True
    export: list[str] = field(default_factory=lambda: ["diffusers"])
    on_nonfinite: str = "stop"
    ema: EMASchema = field(default_factory=EMASchema)
    val_loss: ValLossSchema = field(default_factory=ValLossSchema)


@dataclass
class GuidanceSchema:
    scheduler: str = "DDIMScheduler"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str | None = ""
    guidance_rescale: float = 0.0
    height: int = 512
    width: int = 512


SCHEMAS: dict[str, type] = {"data": DataSchema, "model": ModelSchema, "train": TrainSchema, "guidance": GuidanceSchema,
                            "loss": LossSchema}

# (key, test, what it must be): value rules on the resolved config; a key that is absent or null is not checked.
RULES: list[tuple[str, Any, str]] = [
    ("optimizer.lr", lambda v: v > 0, "> 0"),
    ("model.text_encoder_lr", lambda v: v > 0, "> 0"),
    ("prior.weight", lambda v: v >= 0, ">= 0 (λ of the prior loss)"),
    ("prior.num_images", lambda v: v >= 1, ">= 1"),
    ("prior.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.resolution", lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8 (the VAE downsamples by 8)"),
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.on_bad_image", lambda v: v in ("error", "skip"), "error or skip"),
    ("model.attention", lambda v: v in ("sdpa", "eager"), "sdpa or eager"),
    ("model.family", lambda v: v in ("sd", "sdxl", "sd3", "flux"), "sd, sdxl, sd3 or flux (dreambench.models.families)"),
    ("model.flow.timestep_sampling", lambda v: v in ("logit_normal", "mode", "uniform"), "logit_normal, mode or uniform"),
    ("model.flow.loss_weighting", lambda v: v in ("none", "sigma_sqrt", "cosmap"), "none, sigma_sqrt or cosmap"),
    ("model.flow.logit_std", lambda v: v > 0, "> 0"),
    ("model.max_sequence_length", lambda v: v >= 1, ">= 1"),
    ("model.vae_fp32", lambda v: isinstance(v, bool) or v == "auto", "auto, true or false"),
    ("trainer.max_steps", lambda v: v >= 0, ">= 0 (0: no training, the base model as it is)"),
    ("trainer.accumulate_grad_batches", lambda v: v >= 1, ">= 1"),
    ("trainer.precision", lambda v: str(v) not in ("16-true", "bf16-true", "64-true", "64", "double"),
     "32-true, bf16-mixed or 16-mixed (trainable weights stay fp32)"),
    ("train.checkpoint_every_n_steps", lambda v: v >= 0, ">= 0"),
    ("train.keep_checkpoints", lambda v: v >= 1, ">= 1"),
    ("train.sample_every_n_steps", lambda v: v >= 0, ">= 0"),
    ("train.lr_warmup_steps", lambda v: v >= 0, ">= 0"),
    ("train.on_nonfinite", lambda v: v in ("stop", "skip"), "stop or skip"),
    ("guidance.num_inference_steps", lambda v: v >= 1, ">= 1"),
    ("seed", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("threads", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "null or an integer >= 1"),
    ("data.caption_dropout", lambda v: 0 <= v < 1, "in [0, 1) (a probability; 0 = off)"),
    ("guidance.guidance_rescale", lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
    ("loss.min_snr_gamma", lambda v: v >= 0, ">= 0 (null or 0 = off; 5.0 in Hang et al. 2023)"),
    ("loss.noise_offset", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("loss.input_perturbation", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train.ema.decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train.ema.min_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train.ema.update_after_step", lambda v: v >= 0, ">= 0"),
    ("train.ema.inv_gamma", lambda v: v > 0, "> 0"),
    ("train.ema.power", lambda v: v > 0, "> 0"),
    ("train.ema.every_n_steps", lambda v: v >= 1, ">= 1"),
    ("train.ema.device", lambda v: v in ("same", "cpu"), "same or cpu"),
    ("train.val_loss.every_n_steps", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train.val_loss.holdout", lambda v: v >= 0, ">= 0"),
    ("train.val_loss.class_images", lambda v: v >= 0, ">= 0"),
    ("train.val_loss.timesteps", lambda v: v >= 1, ">= 1"),
    ("train.val_loss.seed", lambda v: v >= 0, ">= 0"),
]


@functools.cache
def _declared(conf_dir: str, group: str) -> frozenset[str]:
    """First-level keys declared by the option files of conf/<group>/ (or of train.yaml's own section)."""
    root = Path(conf_dir)
    keys: set[str] = set()
    files = list((root / group).glob("*.yaml")) if (root / group).is_dir() else []
    for f in files:
        text = f.read_text()
        if any("@package _global_" in line for line in text.splitlines()[:3]):
            continue  # an override file (experiment, preset), not a declaration
        node = OmegaConf.load(f)
        if isinstance(node, DictConfig):
            keys |= {str(k) for k in node if k != "defaults"}
    primary = OmegaConf.load(root / "train.yaml")
    if group in primary and isinstance(primary[group], DictConfig):
        keys |= {str(k) for k in primary[group]}
    return frozenset(keys)


@functools.cache
def _top_level(conf_dir: str) -> frozenset[str]:
    root = Path(conf_dir)
    groups = {p.name for p in root.iterdir() if p.is_dir()}
    return frozenset(groups | {str(k) for k in OmegaConf.load(root / "train.yaml") if k != "defaults"})


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] / X | None
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _unknown(prefix: str, keys: list[str], allowed: set[str]) -> list[str]:
    out = []
    for k in keys:
        if k in allowed:
            continue
        near = difflib.get_close_matches(k, sorted(allowed), n=1)
        out.append(f"unknown key {prefix}{k}" + (f" (did you mean {prefix}{near[0]}?)" if near else ""))
    return out


def _target_params(target: str) -> tuple[set[str], bool] | None:
    """(parameter names, accepts **kwargs) of a `_target_`; None if it cannot be imported."""
    from hydra._internal.utils import _locate
    try:
        obj = _locate(target)
    except Exception:  # noqa: BLE001 - reported by the caller
        return None
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _forbidden_keys(node: Any, path: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}" if path else str(k)
            if str(k).lower() in FORBIDDEN:
                out.append(f"{here} cannot be set from a config (it would run code shipped with a model)")
            out += _forbidden_keys(v, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _forbidden_keys(v, f"{path}[{i}]")
    return out


def _plain(node: Any) -> Any:
    """The config as plain data, resolved where it resolves (under the compose API `${hydra:...}` does not;
    such a value is kept unresolved rather than failing the whole check)."""
    if not isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001
        raw = OmegaConf.to_container(node, resolve=False)
        out = {}
        for k in node:
            try:
                out[k] = _plain(node[k])
            except Exception:  # noqa: BLE001
                out[k] = raw[k]
        return out


def _check_fields(prefix: str, node: dict, schema: type, mistyped: set[str]) -> list[str]:
    hints = typing.get_type_hints(schema)
    found = _unknown(f"{prefix}.", list(node), set(hints))
    for k, v in node.items():
        if k in hints and v != "???" and not _type_ok(v, hints[k]):
            found.append(f"{prefix}.{k}={v!r} should be {_type_name(hints[k])}")
            mistyped.add(f"{prefix}.{k}")
    return found


def problems(cfg: DictConfig, conf_dir: str | Path = CONF_DIR) -> list[str]:
    conf_dir = str(conf_dir)
    raw = OmegaConf.to_container(cfg, resolve=False)
    found = _forbidden_keys(raw)
    c = _plain(cfg)
    mistyped: set[str] = set()
    found += _unknown("", [str(k) for k in c], set(_top_level(conf_dir)))
    for group, node in c.items():
        if not isinstance(node, dict):
            continue
        schema = SCHEMAS.get(group)
        if "_target_" in node:
            params = _target_params(str(node["_target_"]))
            if params is None:
                found.append(f"{group}._target_={node['_target_']} cannot be imported (a missing optional "
                             f"dependency?)")
            elif not params[1]:
                found += _unknown(f"{group}.", [k for k in node if k not in HYDRA_KEYS], params[0])
        elif schema is not None or (Path(conf_dir) / group).is_dir() or group == "train":
            allowed = set(_declared(conf_dir, group)) | ({f.name for f in dataclasses.fields(schema)} if schema else set())
            if allowed:
                found += _unknown(f"{group}.", list(node), allowed)
        if schema is not None:
            hints = typing.get_type_hints(schema)
            for k, v in node.items():
                if k in hints and dataclasses.is_dataclass(hints[k]):  # a nested section, e.g. train.ema
                    if isinstance(v, dict):
                        found += _check_fields(f"{group}.{k}", v, hints[k], mistyped)
                    elif v is not None:
                        found.append(f"{group}.{k}={v!r} should be a section ({', '.join(typing.get_type_hints(hints[k]))})")
                    continue
                if k in hints and v != "???" and not _type_ok(v, hints[k]):
                    found.append(f"{group}.{k}={v!r} should be {_type_name(hints[k])}")
                    mistyped.add(f"{group}.{k}")
    for key, test, must in RULES:
        if key in mistyped:  # already reported
            continue
        v: Any = c
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if v is None or v == "???":
            continue
        try:
            ok = bool(test(v))
        except TypeError:
            ok = False
        if not ok:
            found.append(f"{key}={v!r} must be {must}")
    data = c.get("data") if isinstance(c.get("data"), dict) else {}
    if data.get("buckets") is True and data.get("batch_size") not in (1, None, "???"):
        found.append(f"data.buckets=true trains one photo per step (each at its own shape): data.batch_size="
                     f"{data.get('batch_size')!r} must be 1")
    val = (c.get("train") or {}).get("val_loss") if isinstance(c.get("train"), dict) else None
    prior = c.get("prior") if isinstance(c.get("prior"), dict) else {}
    k_cls, n_cls = (val or {}).get("class_images"), prior.get("num_images")
    if isinstance(k_cls, int) and k_cls > 0 and isinstance(n_cls, int) and k_cls >= n_cls:
        found.append(f"train.val_loss.class_images={k_cls} must be < prior.num_images={n_cls} (class images are "
                     f"held out of the prior batch; some must be left to train on)")
    return list(dict.fromkeys(found))


def validate(cfg: DictConfig, conf_dir: str | Path = CONF_DIR) -> None:
    found = problems(cfg, conf_dir)
    if found:
        raise UserError("invalid config: " + "; ".join(found))
