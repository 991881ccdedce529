"""Task adapters of the one training loop (the contract: :mod:`.base`).

=================  ==============  ===========================================================
task               model kind      what it trains on
=================  ==============  ===========================================================
``lm``             causal_lm       next bytes of a text corpus (random windows, or streams + TBPTT)
``mqar``           causal_lm       multi-query associative recall (:mod:`hierseq.data.synthetic`)
``masked_bytes``   masked_ae       masked bytes of a text corpus
``masked_signal``  masked_ae       masked positions of continuous multichannel sinusoid mixtures
``regression``     seq_regression  a synthetic sensor task of :mod:`hierseq.data.signals`
=================  ==============  ===========================================================
"""

from __future__ import annotations

from .base import Task
from .lm import LMTask
from .masked import MaskedBytesTask, MaskedSignalTask
from .mqar import MQARTask
from .regression import RegressionTask

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (LMTask, MQARTask, MaskedBytesTask, MaskedSignalTask, RegressionTask)
}

#: the task a config without ``task`` gets, by model kind.
DEFAULT_TASKS: dict[str, str] = {"causal_lm": "lm", "masked_ae": "masked_bytes", "seq_regression": "regression"}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"task={name!r}: must be one of {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["DEFAULT_TASKS", "TASKS", "Task", "task_class"]
