"""The `method` config group: what is trained and how it is exported. The LightningModule is the same for all."""

from dreambench.methods.base import Method
from dreambench.methods.dreambooth import DreamBooth

__all__ = ["Method", "DreamBooth"]
