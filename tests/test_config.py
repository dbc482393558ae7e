"""Typed configuration: loading, overrides, errors that name the key, YAML round trip."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crucible.cli import stage_main
from crucible.config import dump_config, load_config
from crucible.errors import ConfigError
from model.config import ModelConfig
from training.config import PretrainConfig

ROOT = Path(__file__).resolve().parent.parent

# Which root config each folder of configs/ holds.
ROOTS = {"pretrain": PretrainConfig, "model": ModelConfig}


def _root_for(path: Path):
    folder = path.relative_to(ROOT / "configs").parts[0]
    try:
        from tests.config_roots import EXTRA_ROOTS
    except ImportError:
        EXTRA_ROOTS = {}
    return {**ROOTS, **EXTRA_ROOTS}[folder]


ALL_YAML = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_are_recipes():
    assert ALL_YAML


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    cfg = load_config(_root_for(path), path)
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_config(cfg))
    again = load_config(type(cfg), out)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)


def _write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_override_applies_and_parses_types(tmp_path):
    cfg = load_config(PretrainConfig, _write(tmp_path, {"train": {"max_steps": 5}}),
                      ["train.max_steps=7", "optim.lr=1e-3", "train.precision=bf16"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3 and cfg.train.precision == "bf16"


def test_unknown_key_in_file_names_key_file_and_allowed(tmp_path):
    path = _write(tmp_path, {"train": {"max_stepz": 5}})
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, path)
    msg = str(err.value)
    assert "train.max_stepz" in msg and str(path) in msg and "max_steps" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"trian: unknown key .*allowed keys here: .*train"):
        load_config(PretrainConfig, _write(tmp_path, {"trian": {}}))


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train.max_steps: .*integer.*'abc'.*command-line override"):
        load_config(PretrainConfig, None, ["train.max_steps=abc"])


def test_out_of_range_and_choices():
    with pytest.raises(ConfigError, match=r"optim.lr: .*greater than 0"):
        load_config(PretrainConfig, None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"train.zero_stage: .*0, 1, 2 or 3"):
        load_config(PretrainConfig, None, ["train.zero_stage=4"])


def test_impossible_combination_names_both_keys():
    with pytest.raises(ConfigError, match=r"train.offload_params=cpu needs train.zero_stage=3"):
        load_config(PretrainConfig, None, ["train.offload_params=cpu", "train.zero_stage=2"])
    with pytest.raises(ConfigError, match=r"model.dim \(100\) must be divisible by model.n_heads"):
        load_config(PretrainConfig, None, ["model.dim=100", "model.n_heads=3"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(PretrainConfig, None, ["train.max_steps"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, "nope.yaml")


def test_stage_main_exit_codes(capsys):
    seen = []
    assert stage_main(PretrainConfig, lambda cfg, args: seen.append(cfg) or 0, "x", "d",
                      argv=["train.max_steps=3", "--local_rank=1"]) == 0
    assert seen[0].train.max_steps == 3
    assert stage_main(PretrainConfig, lambda cfg, args: 0, "x", "d", argv=["train.max_stepz=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.max_stepz" in err


@pytest.mark.parametrize("override,key", [("train.max_stepz=1", "train.max_stepz"),
                                           ("train.max_steps=abc", "train.max_steps")])
def test_launcher_exits_2_naming_the_key(override, key):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launcher/pretrain.py"), "--config",
         str(ROOT / "configs/pretrain/cpu_tiny.yaml"), override],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_launcher_help_lists_documented_fields():
    proc = subprocess.run([sys.executable, str(ROOT / "launcher/pretrain.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "train.max_steps (int, default 100): Stop after this many optimizer steps." in proc.stdout
    assert "--local_rank" in proc.stdout


def test_preset_keys_do_not_count_as_set_explicitly(tmp_path):
    """A preset fills its shape in, but only keys the recipe or the command line gave count as
    set: that is how pretraining tells a preset's max_seq_len (which follows the shards) from a
    chosen one (which must hold them)."""
    from model.config import max_seq_len_is_explicit

    recipe = load_config(PretrainConfig, ROOT / "configs/pretrain/cpu_tiny.yaml")
    assert recipe.model.max_seq_len == 128 and recipe.model.dim == 64  # the tiny preset's
    assert recipe.model.model_fields_set == {"preset"} and not max_seq_len_is_explicit(recipe.model)
    assert not max_seq_len_is_explicit(ModelConfig())
    assert max_seq_len_is_explicit(ModelConfig(preset="tiny", max_seq_len=128))
    override = load_config(PretrainConfig, ROOT / "configs/pretrain/cpu_tiny.yaml", ["model.max_seq_len=128"])
    assert max_seq_len_is_explicit(override.model)
    in_file = load_config(PretrainConfig, ROOT / "configs/pretrain/gpu_125m_zero1.yaml")
    assert max_seq_len_is_explicit(in_file.model) and in_file.model.max_seq_len == 2048
    # a saved (resolved) config names every key, so it reloads as explicit
    out = tmp_path / "config.yaml"
    out.write_text(dump_config(recipe))
    assert max_seq_len_is_explicit(load_config(PretrainConfig, out).model)


def test_resolving_with_the_data_sequence_length():
    from model.config import resolve_model_config

    tiny = ModelConfig(preset="tiny")
    assert resolve_model_config(tiny, vocab_size=300, seq_len=256).max_seq_len == 256
    assert resolve_model_config(tiny, vocab_size=300, seq_len=64).max_seq_len == 128
    assert resolve_model_config(ModelConfig(preset="tiny", max_seq_len=100), seq_len=256).max_seq_len == 100
    assert resolve_model_config(ModelConfig(), seq_len=1024).max_seq_len == 1024  # the default 256 grows too
    resolved = resolve_model_config(tiny, vocab_size=300, seq_len=256)
    assert resolve_model_config(resolved, vocab_size=300, seq_len=64) == resolved  # idempotent once resolved


def test_planned_world_size_must_be_positive():
    with pytest.raises(ConfigError, match="train.planned_world_size"):
        load_config(PretrainConfig, ROOT / "configs/pretrain/cpu_tiny.yaml", ["train.planned_world_size=0"])


def test_a_dotted_index_into_a_list_is_refused_with_the_way_to_override_it():
    with pytest.raises(ConfigError, match="override the whole list"):
        load_config(PretrainConfig, Path("configs/pretrain/cpu_anneal.yaml"), ["data.phases.0.start_step=8"])
