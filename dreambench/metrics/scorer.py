"""Scoring image sets with the protocol's encoders: encoders loaded once, real-image embeddings cached per
subject folder, images encoded in batches. Used by `dreambench.evaluate` and the drift callback."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from PIL import Image

from dreambench.metrics.functional import clip_t_text
from dreambench.metrics.scores import CLIPIScore, CLIPTScore, DINOScore, DIVScore, PRESScore

UNAVAILABLE = "unavailable"


class EvalInputError(ValueError):
    """Bad input to the evaluation (missing folder, undecodable image, unknown subject): one-line message."""


def one_line(e: BaseException) -> str:
    return " | ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def load_images(paths: Sequence[Path]) -> list[Image.Image]:
    from dreambench.data.images import load_image

    out = []
    for p in paths:
        try:
            out.append(load_image(p))
        except Exception as e:  # noqa: BLE001 - BadImageError, OSError...: all become one clear message
            raise EvalInputError(f"cannot read image {p}: {one_line(e)}") from None
    return out


def real_image_paths(folder: Path) -> list[Path]:
    from dreambench.data.images import validate_image_folder

    try:
        return validate_image_folder(folder, min_size=1, what="real images")
    except (OSError, ValueError) as e:
        raise EvalInputError(one_line(e)) from None


@dataclass
class Item:
    path: Path
    prompt_index: int  # index into the subject's prompt list
    image_index: int
    prompt: str
    seed: int | None = None


@dataclass
class ImageSet:
    """One subject's generated images: prompt images (DINO, CLIP-I, CLIP-T, DIV) and bare class-prompt
    images (PRES)."""

    subject: str
    class_noun: str
    identifier: str
    real_folder: Path
    items: list[Item]
    class_items: list[Item] = field(default_factory=list)


class MetricSet:
    """The five protocol metrics over one fixed subject list; sets from several runs merge by state sums."""

    def __init__(self, subjects: Sequence[str]):
        self.subjects = list(subjects)
        self.dino, self.clip_i, self.clip_t = DINOScore(subjects), CLIPIScore(subjects), CLIPTScore(subjects)
        self.pres, self.div = PRESScore(subjects), DIVScore(subjects)

    def items(self):
        return {"dino": self.dino, "clip_i": self.clip_i, "clip_t": self.clip_t, "pres": self.pres,
                "div": self.div}.items()

    def merge(self, other: "MetricSet") -> None:
        for name, m in self.items():
            m.merge_state(getattr(other, name))
            # merge_state leaves the update counter alone, and compute() would then warn of no updates.
            m._update_count += getattr(other, name)._update_count


class Scorer:
    def __init__(self, dino, clip, lpips=None, clip_t_text: str = "without_identifier"):
        self.dino, self.clip = dino, clip
        # An LPIPSDistance, or a string saying why DIV is unavailable.
        self.lpips = lpips if lpips is not None else f"{UNAVAILABLE}: no LPIPS configured"
        self.clip_t_rule = clip_t_text
        self._real: dict[str, dict[str, Any]] = {}
        self._text: dict[str, torch.Tensor] = {}

    @property
    def lpips_available(self) -> bool:
        return not isinstance(self.lpips, str)

    def embed(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        return {"dino": self.dino.embed(images), "clip": self.clip.embed_images(images)}

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self._text]
        if todo:
            for t, e in zip(todo, self.clip.embed_texts(todo)):
                self._text[t] = e
        return torch.stack([self._text[t] for t in texts])

    def real(self, folder: str | Path, images: Sequence[Image.Image] | None = None) -> dict[str, Any]:
        """Real images of a subject and their embeddings, computed once per folder."""
        key = str(Path(folder).resolve())
        if key not in self._real:
            if images is None:
                paths = real_image_paths(Path(folder))
                images = load_images(paths)
            else:
                paths = [Path(folder) / f"{i:02d}" for i in range(len(images))]
            self._real[key] = {"paths": paths, "images": list(images), **self.embed(images)}
        return self._real[key]

    def card(self) -> dict[str, Any]:
        return {"dino": self.dino.card(), "clip": self.clip.card(),
                "lpips": self.lpips.card() if self.lpips_available else self.lpips,
                "clip_t_text": self.clip_t_rule}

    # ---------------------------------------------------------------------------------------------- scoring

    def score_set(self, s: ImageSet, metrics: MetricSet) -> tuple[list[dict], list[dict]]:
        """Updates `metrics` with one subject's images; returns (per-image records, per-prompt records)."""
        if not s.items:
            raise EvalInputError(f"no generated images for subject {s.subject!r}")
        real = self.real(s.real_folder)
        images = load_images([it.path for it in s.items])
        emb = self.embed(images)
        texts = [clip_t_text(it.prompt, s.identifier, self.clip_t_rule) for it in s.items]
        text_emb = self.embed_texts(texts)

        metrics.dino.update(emb["dino"], real["dino"], s.subject)
        metrics.clip_i.update(emb["clip"], real["clip"], s.subject)
        metrics.clip_t.update(emb["clip"], text_emb, s.subject)
        dino_img = (emb["dino"].double() @ real["dino"].double().T).mean(1)  # per image, mean over real
        clip_i_img = (emb["clip"].double() @ real["clip"].double().T).mean(1)
        clip_t_img = (emb["clip"].double() * text_emb.double()).sum(1)

        records = [{"subject": s.subject, "prompt_index": it.prompt_index, "image_index": it.image_index,
                    "prompt": it.prompt, "clip_t_text": texts[i], "seed": it.seed, "path": str(it.path),
                    "dino": float(dino_img[i]), "clip_i": float(clip_i_img[i]), "clip_t": float(clip_t_img[i])}
                   for i, it in enumerate(s.items)]

        per_prompt = []
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(s.items):
            groups.setdefault(it.prompt_index, []).append(i)
        div_means = []
        for p, idx in sorted(groups.items()):
            row = {"subject": s.subject, "prompt_index": p, "prompt": s.items[idx[0]].prompt, "n_images": len(idx)}
            for k in ("dino", "clip_i", "clip_t"):
                row[k] = sum(records[i][k] for i in idx) / len(idx)
            if self.lpips_available and len(idx) >= 2:
                row["div"] = self.lpips.group_mean([images[i] for i in idx])
                div_means.append(row["div"])
            per_prompt.append(row)
        if div_means:
            metrics.div.update(torch.tensor(div_means, dtype=torch.float64), s.subject)

        if s.class_items:
            cls_emb = self.dino.embed(load_images([it.path for it in s.class_items]))
            metrics.pres.update(cls_emb, real["dino"], s.subject)
            pres_img = (cls_emb.double() @ real["dino"].double().T).mean(1)
            records += [{"subject": s.subject, "prompt_index": "class", "image_index": it.image_index,
                         "prompt": it.prompt, "clip_t_text": None, "seed": it.seed, "path": str(it.path),
                         "pres": float(pres_img[i])} for i, it in enumerate(s.class_items)]
        return records, per_prompt

    def score_real(self, subject: str, folder: Path, metrics: MetricSet) -> list[dict]:
        """The "Real images" row: distinct pairs of a subject's real images."""
        real = self.real(folder)
        n = len(real["paths"])
        if n < 2:
            raise EvalInputError(f"subject {subject!r} has {n} real image(s) in {folder}; distinct pairs need 2")
        metrics.dino.update(real["dino"], real["dino"], subject, distinct=True)
        metrics.clip_i.update(real["clip"], real["clip"], subject, distinct=True)
        out = []
        for k in ("dino", "clip"):
            cos = real[k].double() @ real[k].double().T
            out.append((cos.sum(1) - cos.diagonal()) / (n - 1))  # per image, mean over the other real images
        return [{"subject": subject, "prompt_index": "real", "image_index": i, "prompt": None, "path": str(p),
                 "dino": float(out[0][i]), "clip_i": float(out[1][i])} for i, p in enumerate(real["paths"])]


def build_scorer(metrics_cfg: Mapping[str, Any]) -> Scorer:
    """Encoders from the `metrics` config group (conf/metrics/*.yaml), loaded once."""
    device = metrics_cfg.get("device", "auto")
    batch_size = int(metrics_cfg.get("batch_size", 32))
    dino = instantiate(metrics_cfg["dino"], batch_size=batch_size, device=device)
    clip = instantiate(metrics_cfg["clip"], batch_size=batch_size, device=device)
    lpips = instantiate(metrics_cfg["lpips"], device=device) if metrics_cfg.get("lpips") else None
    return Scorer(dino, clip, lpips, clip_t_text=metrics_cfg.get("clip_t_text", "without_identifier"))
