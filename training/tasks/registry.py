"""The fine-tune task kinds by name: the one place that knows which kinds exist.

A new kind is a :class:`~training.tasks.base.TaskKind` subclass in its own module, listed here
(its head goes in ``model/heads.py``, and ``task.kind`` in ``training/tasks/config.py`` admits it).
"""

from __future__ import annotations

from training.tasks.base import TaskKind
from training.tasks.classification import ClassificationTask
from training.tasks.config import TaskConfig
from training.tasks.qa import QuestionAnsweringTask
from training.tasks.token_classification import TokenClassificationTask

TASK_KINDS: dict[str, type[TaskKind]] = {
    cls.kind: cls for cls in (ClassificationTask, TokenClassificationTask, QuestionAnsweringTask)
}


def task_kind(cfg: TaskConfig) -> TaskKind:
    """The task kind object configured by ``cfg`` (``task.kind``)."""
    return TASK_KINDS[cfg.kind](cfg)
