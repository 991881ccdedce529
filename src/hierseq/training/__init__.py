"""Training: the one loop (schedule, clipping, accumulation, eval, checkpoints, DDP) and its task adapters."""

from .config import TrainConfig
from .tasks import DEFAULT_TASKS, TASKS
from .trainer import evaluate, train

__all__ = ["DEFAULT_TASKS", "TASKS", "TrainConfig", "evaluate", "train"]
