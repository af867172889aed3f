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
    `StableDiffusionPipeline.load_textual_inversion(path, token=...)` reads.

    A family with several CLIP text encoders (SDXL) gets the token in every tokenizer and a row learned in every
    encoder, exported as one file {"clip_l": row of text_encoder, "clip_g": row of text_encoder_2}, the layout of
    SDXL embeddings that diffusers' docs load with one `load_textual_inversion` per encoder (`load_artefact`)."""

    name = "textual_inversion"
    train_text_encoder = True  # the embedding changes every step: prompts are encoded every step
    SDXL_KEYS = ("clip_l", "clip_g")  # the file keys of an SDXL embedding, in the pipeline's encoder order

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
        self.token_ids: list[int] = []  # per text encoder
        self._orig: list[torch.Tensor] = []
        self._keep: list[torch.Tensor] = []

    @property
    def token_id(self) -> int | None:  # the first encoder's (SD has one)
        return self.token_ids[0] if self.token_ids else None

    def identifier_token(self, identifier: str) -> str:
        # The token the prompts carry in place of the identifier ("a <sks> dog in the jungle").
        return self.placeholder.format(identifier=identifier)

    @staticmethod
    def _pairs(module: Any) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) of every CLIP encoder of the model's family (SD: one; SDXL: two)."""
        family = module.family
        return [(getattr(module, t), getattr(module, e)) for t, e in zip(family.tokenizers, family.text_encoders)]

    def prepare(self, module: Any) -> None:
        self.token = module.identifier
        init_text = self.initializer if self.initializer is not None else str(module.run_cfg.data.class_noun)
        module.unet.requires_grad_(False)
        self.token_ids, self._orig, self._keep = [], [], []
        for tok, te in self._pairs(module):
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
            token_id = tok.convert_tokens_to_ids(self.token)
            # mean_resizing=False: new rows are written below; the other rows are copied unchanged.
            te.resize_token_embeddings(len(tok), mean_resizing=False)
            emb = te.get_input_embeddings().weight
            with torch.no_grad():
                emb[token_id] = emb[torch.tensor(init_ids)].mean(0)
            te.requires_grad_(False)
            emb.requires_grad_(True)
            keep = torch.ones(emb.shape[0], dtype=torch.bool)
            keep[token_id] = False
            self.token_ids.append(token_id)
            self._orig.append(emb.detach().clone())  # the rows to restore (new row included, but masked out)
            self._keep.append(keep)

    def param_groups(self, module: Any, lr: float) -> list[dict[str, Any]]:
        lr = self.lr
        if self.scale_lr:  # Gal et al. / LDM: base lr x (devices x batch size x accumulation)
            t = module.trainer
            lr *= int(module.run_cfg.data.batch_size) * int(t.accumulate_grad_batches) * int(t.world_size)
        return [{"params": [te.get_input_embeddings().weight for _, te in self._pairs(module)], "lr": lr}]

    @torch.no_grad()
    def after_optimizer_step(self, module: Any) -> None:
        for k, (_, te) in enumerate(self._pairs(module)):
            w = te.get_input_embeddings().weight
            if self._orig[k].device != w.device:
                self._orig[k], self._keep[k] = self._orig[k].to(w.device), self._keep[k].to(w.device)
            w[self._keep[k]] = self._orig[k][self._keep[k]].to(w.dtype)

    def trained_prefixes(self, module: Any) -> tuple[str, ...]:
        return tuple(n for n, p in module.named_parameters() if p.requires_grad)

    def learned_embedding(self, module: Any, encoder: int = 0) -> torch.Tensor:
        te = self._pairs(module)[encoder][1]
        i = self.token_ids[encoder]
        return te.get_input_embeddings().weight[i : i + 1].detach()

    def export(self, module: Any, folder: Path) -> None:
        from safetensors.torch import save_file

        rows = [self.learned_embedding(module, k).float().cpu().contiguous() for k in range(len(self.token_ids))]
        tensors = {self.token: rows[0]} if len(rows) == 1 else dict(zip(self.SDXL_KEYS, rows))
        save_file(tensors, str(folder / EMBEDS_FILE))
        write_method_json(
            folder, module.run_cfg, {"method": self.name, "artefact": EMBEDS_FILE, "token": self.token}
        )

    @classmethod
    def load_artefact(cls, pipe, folder: Path, info: dict[str, Any]) -> None:
        path = folder / info["artefact"]
        if getattr(pipe, "text_encoder_2", None) is None:
            pipe.load_textual_inversion(str(path), token=info["token"])
            return
        from safetensors.torch import load_file
        rows = load_file(str(path))
        for key, tok, te in zip(cls.SDXL_KEYS, (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)):
            pipe.load_textual_inversion(rows[key], token=info["token"], text_encoder=te, tokenizer=tok)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "placeholder": self.token,
            "initializer": self.initializer,
            "lr": self.lr,
            "scale_lr": self.scale_lr,
        }
