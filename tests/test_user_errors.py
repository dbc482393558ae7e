"""Messages about conflicting config values name where each value was set: the YAML file, the
command line or the default (a value given on the command line is never blamed on the file)."""

import pytest

from crucible.config import COMMAND_LINE, DEFAULT, describe_value, load_config, value_origin
from crucible.errors import ConfigError
from training.config import PretrainConfig
from training.tasks.config import FinetuneConfig

RECIPE = "configs/finetune/uci_sentiment.yaml"


def test_cross_field_error_names_where_each_key_was_set(tmp_path):
    recipe = tmp_path / "qa.yaml"
    recipe.write_text("task:\n  kind: qa\n  format: squad\n  doc_stride: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, recipe, ["task.max_length=30"])
    assert str(err.value).endswith(
        f"task.doc_stride (32) must be below task.max_length (30) (task.doc_stride from {recipe}, "
        "task.max_length from the command line)")
    with pytest.raises(ConfigError, match=r"needs train.zero_stage=3 \(got 1\) \(train.offload_params from "
                                          r"the command line, train.zero_stage from the default\)"):
        load_config(PretrainConfig, None, ["train.offload_params=cpu"])


def test_values_remember_where_they_were_set():
    """What the warm-up warning of a short run uses to name its sources."""
    cfg = load_config(FinetuneConfig, RECIPE, ["train.max_steps=2"])
    assert value_origin(cfg, "train.max_steps") == COMMAND_LINE
    assert value_origin(cfg, "schedule.warmup_steps") == RECIPE
    assert value_origin(cfg, "train.seed") == DEFAULT
    copy = cfg.model_copy(update={"run_dir": "elsewhere"})  # copies keep it
    assert describe_value(copy, "train.max_steps") == "train.max_steps=2 (from the command line)"
    assert describe_value(copy, "schedule.warmup_steps") == f"schedule.warmup_steps=10 (from {RECIPE})"
    # a config built in code has no sources to name
    assert describe_value(FinetuneConfig(), "train.max_steps") == "train.max_steps=100"
