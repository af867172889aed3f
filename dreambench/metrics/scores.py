"""DreamBench metrics as torchmetrics `Metric`s over embeddings (PROTOCOL.md, "Metrics").

Every metric keeps, per subject of a fixed subject list, a sum and a count (`dist_reduce_fx="sum"`), so states
from several devices or several runs merge by addition (`merge_state`, DDP sync). `compute()` gives the
unweighted mean over subjects that have data (the paper's number), the mean over all pairs, and the
per-subject values (NaN where a subject has no data). Raw cosine in [-1, 1]: no x100, no clamp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


class PerSubjectMean(Metric):
    full_state_update = False
    is_differentiable = False

    def __init__(self, subjects: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        if len(set(subjects)) != len(subjects) or not subjects:
            raise ValueError("subjects must be a non-empty list of distinct names")
        self.subjects = list(subjects)
        self._index = {s: i for i, s in enumerate(self.subjects)}
        # float64: sums over thousands of pairs.
        self.add_state("total", default=torch.zeros(len(self.subjects), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(len(self.subjects), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, subject: str, total: torch.Tensor, count: int | float) -> None:
        if subject not in self._index:
            raise KeyError(f"subject {subject!r} is not in this metric's subject list")
        i = self._index[subject]
        self.total[i] += total.detach().to(self.total.device, torch.float64)
        self.count[i] += float(count)

    def compute(self) -> dict[str, torch.Tensor]:
        have = self.count > 0
        per_subject = torch.where(have, self.total / self.count.clamp_min(1), torch.full_like(self.total, float("nan")))
        if not have.any():
            nan = torch.tensor(float("nan"), dtype=torch.float64)
            return {"mean": nan, "mean_over_pairs": nan, "per_subject": per_subject}
        return {"mean": per_subject[have].mean(),  # unweighted over subjects
                "mean_over_pairs": self.total[have].sum() / self.count[have].sum(),
                "per_subject": per_subject}

    def per_subject(self) -> dict[str, float]:
        values = self.compute()["per_subject"].reshape(-1)  # torchmetrics squeezes a 1-subject list
        return {s: float(values[i]) for i, s in enumerate(self.subjects) if self.count[i] > 0}


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class PairwiseSimilarity(PerSubjectMean):
    """Mean cosine over every (generated, real) pair of a subject: `update(generated (N, D), real (M, D), subject)`.
    `distinct=True` scores a set against itself over pairs of distinct images (the "Real images" row)."""

    higher_is_better = True

    def update(self, generated: torch.Tensor, real: torch.Tensor, subject: str, distinct: bool = False) -> None:
        if generated.ndim != 2 or real.ndim != 2 or generated.shape[1] != real.shape[1]:
            raise ValueError(f"expected (N, D) and (M, D) embeddings, got {tuple(generated.shape)}, {tuple(real.shape)}")
        if len(generated) == 0 or len(real) == 0:
            raise ValueError(f"no embeddings to compare for subject {subject!r}")
        cos = _unit(generated) @ _unit(real).T  # (N, M)
        if distinct:
            if cos.shape[0] != cos.shape[1]:
                raise ValueError("distinct=True compares a set with itself: N must equal M")
            n = cos.shape[0]
            if n < 2:
                raise ValueError(f"subject {subject!r} needs at least 2 images for distinct pairs")
            self._add(subject, cos.sum() - cos.diagonal().sum(), n * (n - 1))
        else:
            self._add(subject, cos.sum(), cos.numel())


class DINOScore(PairwiseSimilarity):
    """Subject fidelity: DINO ViT-S/16 CLS embeddings, generated x real pairs."""


class CLIPIScore(PairwiseSimilarity):
    """Subject fidelity: CLIP projected image embeddings, generated x real pairs."""


class PRESScore(PairwiseSimilarity):
    """Prior preservation (lower is better): DINO of bare class-prompt images x the subject's real images."""

    higher_is_better = False


class CLIPTScore(PerSubjectMean):
    """Prompt fidelity: cosine between image i and the text of its prompt i (rows paired, not all pairs)."""

    higher_is_better = True

    def update(self, images: torch.Tensor, texts: torch.Tensor, subject: str) -> None:
        if images.shape != texts.shape or images.ndim != 2 or len(images) == 0:
            raise ValueError(f"expected matching non-empty (N, D) image and text embeddings, got "
                             f"{tuple(images.shape)}, {tuple(texts.shape)}")
        self._add(subject, (_unit(images) * _unit(texts)).sum(), len(images))


class DIVScore(PerSubjectMean):
    """Diversity (higher is better): `update(group_means (G,), subject)` with, per (subject, prompt) group, the
    mean LPIPS distance over the pairs of its images; averaged over prompts, then over subjects."""

    higher_is_better = True

    def update(self, group_means: torch.Tensor, subject: str) -> None:
        group_means = torch.as_tensor(group_means).reshape(-1)
        if len(group_means) == 0:
            return
        self._add(subject, group_means.sum(), len(group_means))
