"""Root config class of each folder under configs/ (used by tests/test_config.py)."""

from data_pipeline.config import DataPrepConfig
from training.tasks.config import FinetuneConfig

EXTRA_ROOTS = {"data": DataPrepConfig, "finetune": FinetuneConfig}
