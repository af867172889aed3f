"""The `method` config group: what is trained and how it is exported. The LightningModule is the same for all."""

from dreambench.methods.base import Method
from dreambench.methods.dreambooth import DreamBooth
from dreambench.methods.lora import LoRA
from dreambench.methods.runs import load_run_pipeline
from dreambench.methods.textual_inversion import TextualInversion

# method.json's "method" -> the class that loads its artefact onto a base pipeline (load_run_pipeline).
METHODS = {"dreambooth": DreamBooth, "lora": LoRA, "textual_inversion": TextualInversion}

__all__ = ["METHODS", "DreamBooth", "LoRA", "Method", "TextualInversion", "load_run_pipeline"]
