"""The export formats of a run: each reads the run's own `model/` (what training wrote) and writes files other
tools load, under `<run>/export/<format>/`. `model/` stays the source of truth; an export can be redone any time
(`python -m dreambench.export run=<run> format=<name>`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from dreambench.errors import UserError

EXPORT_DIR = "export"


def run_facts(run: Path) -> dict[str, Any]:
    """What the exports are named after: subject, method, identifier (the token prompts carry), base model."""
    from omegaconf import OmegaConf

    from dreambench.methods.runs import read_method_json

    cfg = OmegaConf.load(run / "config.yaml") if (run / "config.yaml").is_file() else None
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    info = read_method_json(run / "model") or {}
    method = info.get("method") or (metrics.get("method") or {}).get("name") or "dreambooth"
    return {
        "subject": str(cfg.data.subject) if cfg is not None else run.name,
        "method": method,
        "identifier": metrics.get("identifier") or info.get("token"),
        "steps": metrics.get("steps"),
        "base": info.get("base_model") or (dict(cfg.model) if cfg is not None else {}),
        "family": str((info.get("base_model") or {}).get("family")
                      or (cfg.model.get("family") if cfg is not None else None) or "sd"),
    }


def _slug(text: str) -> str:
    # File names double as names inside the tools (A1111 calls an embedding by its file name): keep them plain.
    return re.sub(r"[^A-Za-z0-9_-]+", "", text.replace(" ", "_")) or "subject"


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    from dreambench.utils.io import atomic_write_bytes

    atomic_write_bytes(path, save(tensors, metadata=metadata))


class Format:
    name = "format"
    methods: tuple[str, ...] = ()
    what = ""

    def applies(self, method: str) -> bool:
        return method in self.methods

    def export(self, run: Path, facts: dict[str, Any]) -> list[Path]:
        raise NotImplementedError

    def existing(self, run: Path) -> list[Path]:
        """The files an earlier export of this format left in the run folder."""
        folder = run / EXPORT_DIR / self.name
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if folder.is_dir() else []


class Diffusers(Format):
    """Today's `model/`: a whole diffusers pipeline (dreambooth) or the method's diffusers artefact + method.json."""

    name, methods = "diffusers", ("dreambooth", "lora", "textual_inversion")
    what = "diffusers folder: from_pretrained / load_lora_weights / load_textual_inversion"

    def export(self, run: Path, facts: dict[str, Any]) -> list[Path]:
        return self.existing(run)

    def existing(self, run: Path) -> list[Path]:
        return sorted(p for p in (run / "model").rglob("*") if p.is_file())


class SingleFile(Format):
    """One `.safetensors` checkpoint in the original key layout of the model's family. A LoRA run is merged into
    its base model first (W + alpha/r * B A), so the checkpoint needs no adapter support in the tool."""

    name, methods = "single_file", ("dreambooth", "lora")
    what = "one checkpoint in the original layout: ComfyUI / A1111 checkpoint folder, from_single_file"

    def export(self, run: Path, facts: dict[str, Any]) -> list[Path]:
        from dreambench.exporters import family_of
        from dreambench.methods import load_run_pipeline

        pipe = load_run_pipeline(run)
        if facts["method"] == "lora":
            pipe.fuse_lora()
            pipe.unload_lora_weights()  # after fuse_lora this keeps the merged weights and drops the adapters
        family = family_of(pipe)
        out = run / EXPORT_DIR / self.name / f"{_slug(facts['subject'])}-{facts['method']}.safetensors"
        _save_safetensors(out, family.to_original(pipe), {"format": "pt", "dreambench_family": family.NAME})
        return [out]


class Kohya(Format):
    """LoRA in kohya-ss's key layout (`lora_unet_*`, `lora_te_*`, `.lora_down/.lora_up/.alpha`), what ComfyUI,
    A1111/Forge and InvokeAI load, and diffusers' `load_lora_weights` too.

    Not diffusers' `convert_state_dict_to_kohya`: it names SD 1.x/2.x's text encoder `lora_te1_` (SDXL's first
    encoder), writes alpha = rank whatever alpha the adapter was trained with (a run with alpha != rank would load
    at the wrong strength), and with transformers 5 (whose CLIPTextModel has no `text_model.` level) it drops the
    `text_model_` part of the text-encoder names the tools match on."""

    name, methods = "kohya", ("lora",)
    what = "LoRA for ComfyUI (LoraLoader) / A1111 (<lora:name:1>) / load_lora_weights"

    def export(self, run: Path, facts: dict[str, Any]) -> list[Path]:
        from dreambench.methods.lora import LORA_FILE

        src = run / "model" / LORA_FILE
        tensors, alphas = kohya_state_dict(src)
        meta = {"ss_network_module": "networks.lora", "ss_network_alpha": str(alphas.get("unet", "")),
                "dreambench_run": facts["subject"]}
        out = run / EXPORT_DIR / self.name / f"{_slug(facts['subject'])}-lora.safetensors"
        _save_safetensors(out, tensors, meta)
        return [out]


_DIFFUSERS_LORA = re.compile(r"^(unet|text_encoder)\.(.+?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")


def kohya_state_dict(lora_file: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The diffusers LoRA file of a run -> kohya keys, with each adapter's trained alpha (from the file's
    metadata, written by LoRA.export)."""
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    alphas: dict[str, float] = {}
    for part in ("unet", "text_encoder"):
        if meta.get(f"{part}.rank_pattern") or meta.get(f"{part}.alpha_pattern"):
            raise UserError(f"{lora_file}: per-layer rank/alpha patterns have no kohya equivalent here")
        if f"{part}.lora_alpha" in meta:
            alphas[part] = float(meta[f"{part}.lora_alpha"])
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _DIFFUSERS_LORA.match(key)
        if m is None:
            raise UserError(f"{lora_file}: LoRA key {key!r} is not in the diffusers layout dreambench writes")
        part, module, side = m.groups()
        if part == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module  # the CLIP names the tools expect (transformers < 5 had this level)
        name = ("lora_unet_" if part == "unet" else "lora_te_") + module.replace(".", "_")
        out[f"{name}.lora_{side}.weight"] = t.contiguous()
        if side == "down":
            if part not in alphas:
                raise UserError(f"{lora_file}: no lora_alpha for {part} in the file's metadata")
            out[f"{name}.alpha"] = torch.tensor(alphas[part])
    return out, alphas


class A1111Embedding(Format):
    """A textual-inversion embedding in AUTOMATIC1111's layout (`string_to_param`), which is a pickled dict of
    dicts: safetensors cannot nest, so this one is a `.pt`. It holds tensors, strings and ints only, so it loads
    with `torch.load(weights_only=True)` (as diffusers' load_textual_inversion and A1111 read it). A1111 and
    ComfyUI call an embedding by its file name: that stem is the trigger word."""

    name, methods = "a1111", ("textual_inversion",)
    what = "embedding for A1111 (embeddings/) / ComfyUI (embedding:name) / load_textual_inversion"

    def export(self, run: Path, facts: dict[str, Any]) -> list[Path]:
        from safetensors.torch import load_file

        from dreambench.methods.runs import read_method_json
        from dreambench.utils.io import atomic_write

        info = read_method_json(run / "model")
        saved = load_file(str(run / "model" / info["artefact"]))
        emb = saved[info["token"]].float().reshape(-1, saved[info["token"]].shape[-1])  # [vectors, hidden]
        stem = f"{_slug(facts['identifier'] or 'sks')}-{_slug(facts['subject'])}"
        # 265 is CLIP's id of "*", A1111's placeholder; A1111 reads only string_to_param["*"] and the name.
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": emb.contiguous()}, "name": stem,
                "step": int(facts.get("steps") or 0), "sd_checkpoint": None, "sd_checkpoint_name": None}
        out = run / EXPORT_DIR / self.name / f"{stem}.pt"
        atomic_write(out, lambda f: torch.save(data, f))
        return [out]


FORMATS: dict[str, Format] = {f.name: f for f in (Diffusers(), SingleFile(), Kohya(), A1111Embedding())}
