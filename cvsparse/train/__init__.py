"""Training: the loop, checkpoints and outputs."""

from .loop import CVTrainer, Trainer

__all__ = ["CVTrainer", "Trainer"]
