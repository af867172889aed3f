from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dreambench.methods.base import Method
from dreambench.methods.runs import write_method_json

EMBEDS_FILE = "learned_embeds.safetensors"  # diffusers' format: {token: [1, hidden] tensor}


class TextualInversion(Method):
    """Textual Inversion (Gal et al. 2022): the whole model is frozen and one new token's input embedding is
    learned. The token ("<sks>" by default) is added to the tokenizer and its embedding row initialised from
    the class noun's (the mean of its tokens' rows where the noun is several tokens, e.g. "stuffed animal").
    After every optimizer step all other rows are copied back, so they stay bit-identical to the base model
    (AdamW's weight decay would otherwise move them). Exports the row as a file that
    `StableDiffusionPipeline.load_textual_inversion(path, token=...)` reads."""

    name = "textual_inversion"
    train_text_encoder = True  # the embedding changes every step: prompts are encoded every step

    def __init__(
        self,
        placeholder: str = "<{identifier}>",
        initializer: str | None = None,
        lr: float = 5e-3,
        scale_lr: bool = True,
    ):
        self.placeholder, self.initializer = placeholder, initializer
        self.lr, self.scale_lr = float(lr), bool(scale_lr)
        self.token: str | None = None
        self.token_id: int | None = None
        self._orig: torch.Tensor | None = None
        self._keep: torch.Tensor | None = None

    def identifier_token(self, identifier: str) -> str:
        # The token the prompts carry in place of the identifier ("a <sks> dog in the jungle").
        return self.placeholder.format(identifier=identifier)

    def prepare(self, module: Any) -> None:
        tok, te = module.tokenizer, module.text_encoder
        self.token = module.identifier
        init_text = self.initializer if self.initializer is not None else str(module.run_cfg.data.class_noun)
        init_ids = tok(init_text, add_special_tokens=False).input_ids
        if not init_ids:
            raise ValueError(
                "method=textual_inversion initialises the new token from the class noun, which is "
                "empty here: set method.initializer=<a word>"
            )
        # A placeholder that is already one token ("dog", "sks") would be shadowed for every prompt.
        if len(tok(self.token, add_special_tokens=False).input_ids) == 1 or tok.add_tokens(self.token) != 1:
            raise ValueError(
                f"method=textual_inversion: token {self.token!r} is already in the tokenizer; choose "
                f"another with method.placeholder=..."
            )
        self.token_id = tok.convert_tokens_to_ids(self.token)
        # mean_resizing=False: new rows are written below; the other rows are copied unchanged.
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = te.get_input_embeddings().weight
        with torch.no_grad():
            emb[self.token_id] = emb[torch.tensor(init_ids)].mean(0)
        module.unet.requires_grad_(False)
        te.requires_grad_(False)
        emb.requires_grad_(True)
        self._orig = emb.detach().clone()  # the rows to restore (new row included, but masked out)
        self._keep = torch.ones(emb.shape[0], dtype=torch.bool)
        self._keep[self.token_id] = False

    def param_groups(self, module: Any, lr: float) -> list[dict[str, Any]]:
        lr = self.lr
        if self.scale_lr:  # Gal et al. / LDM: base lr x (devices x batch size x accumulation)
            t = module.trainer
            lr *= int(module.run_cfg.data.batch_size) * int(t.accumulate_grad_batches) * int(t.world_size)
        return [{"params": [module.text_encoder.get_input_embeddings().weight], "lr": lr}]

    @torch.no_grad()
    def after_optimizer_step(self, module: Any) -> None:
        w = module.text_encoder.get_input_embeddings().weight
        if self._orig.device != w.device:
            self._orig, self._keep = self._orig.to(w.device), self._keep.to(w.device)
        w[self._keep] = self._orig[self._keep].to(w.dtype)

    def trained_prefixes(self, module: Any) -> tuple[str, ...]:
        return tuple(n for n, p in module.named_parameters() if p.requires_grad)

    def learned_embedding(self, module: Any) -> torch.Tensor:
        return module.text_encoder.get_input_embeddings().weight[self.token_id : self.token_id + 1].detach()

    def export(self, module: Any, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {self.token: self.learned_embedding(module).float().cpu().contiguous()}, str(folder / EMBEDS_FILE)
        )
        write_method_json(
            folder, module.run_cfg, {"method": self.name, "artefact": EMBEDS_FILE, "token": self.token}
        )

    @staticmethod
    def load_artefact(pipe, folder: Path, info: dict[str, Any]) -> None:
        pipe.load_textual_inversion(str(folder / info["artefact"]), token=info["token"])

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "placeholder": self.token,
            "initializer": self.initializer,
            "lr": self.lr,
            "scale_lr": self.scale_lr,
        }
