"""Training: the loop (schedule, clipping, accumulation, TBPTT, eval, DDP), checkpoints and logging."""

from .trainer import TrainConfig, evaluate, train

__all__ = ["TrainConfig", "evaluate", "train"]
