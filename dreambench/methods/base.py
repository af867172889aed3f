from __future__ import annotations

from pathlib import Path
from typing import Any


class Method:
    """One fine-tuning method. The module calls, in order: `prepare` (freeze / add adapters / add tokens,
    before the optimizer exists), `param_groups` (for the optimizer), `after_optimizer_step` (e.g. restore
    embedding rows that must not change), `trained_prefixes` (what a checkpoint's state_dict keeps) and
    `export` (the artefact of the run)."""

    name = "method"
    # True when text-encoder weights are trained: the module then encodes prompts every step instead of
    # caching the embeddings once.
    train_text_encoder = False

    def identifier_token(self, identifier: str) -> str:
        # What the prompts carry for the subject: the identifier itself, or a new token (textual inversion).
        return identifier

    def prepare(self, module: Any) -> None:
        raise NotImplementedError

    def param_groups(self, module: Any, lr: float) -> list[dict[str, Any]]:
        raise NotImplementedError

    def after_optimizer_step(self, module: Any) -> None:
        pass

    def trained_prefixes(self, module: Any) -> tuple[str, ...]:
        raise NotImplementedError

    def export(self, module: Any, folder: Path) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        return {"name": self.name}
