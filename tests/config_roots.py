"""Root config class of each folder under configs/ (used by tests/test_config.py)."""

from data_pipeline.config import DataPrepConfig

EXTRA_ROOTS = {"data": DataPrepConfig}
