"""Pocket-Teacher: distil a large language model into a small one, notebook-first.

Stages, one module each, imported one way: config -> data -> models -> students -> batches -> plan -> losses ->
teacher_cache / generate -> evaluate -> train -> report / plots -> runfolder -> experiment -> cli.
"""

from .config import Config, ConfigError, apply_overrides, get_preset
from .losses import DistillationLoss, distillation_loss

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "DistillationLoss", "apply_overrides", "distillation_loss", "get_preset"]
