import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One ninja for every DeepSpeed op build of the suite, in process and in launched ranks: the
# environment's (the `deepspeed` command puts it first), not the system's, whose other version
# would make each build find the other's stale and rebuild (45-100 s each; training.engine.
# use_environment_ninja does the same for runs started as plain python)
_ENV_BIN = str(Path(sys.executable).parent)
os.environ["PATH"] = os.pathsep.join([_ENV_BIN, *(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                  if p != _ENV_BIN)])
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _no_leaked_shared_memory():
    """Every test leaves /dev/shm as it found it (see tests.harness.remove_orphan_shm_segments)."""
    yield
    from tests.harness import remove_orphan_shm_segments

    remove_orphan_shm_segments()


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight model directory with the shared test tokenizer (a stand-in for a
    pretrained checkpoint where only the plumbing is under test)."""
    import torch

    from model.config import ModelConfig
    from model.io import save_model_dir
    from model.transformer import Transformer
    from tests.datasets import shared_token_dataset

    tok_dir = shared_token_dataset(tmp_path_factory).parent.parent / "tokenizer"
    out = tmp_path_factory.mktemp("pretrained") / "model"
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    save_model_dir(out, Transformer(cfg).state_dict(), cfg, tokenizer_dir=tok_dir)
    return out


@pytest.fixture(scope="session")
def mp_manifest(tmp_path_factory) -> Path:
    """The token shards of the pipeline- and tensor-parallel tests (tests/model_parallel.py)."""
    from tests.datasets import make_token_dataset

    return make_token_dataset(tmp_path_factory.mktemp("mp-tokens"))


@pytest.fixture(scope="session")
def mp_reference(tmp_path_factory, mp_manifest) -> Path:
    """The 1-rank run every model-parallel layout is compared with (tests/model_parallel.py)."""
    from tests.model_parallel import STEPS, by_step, launch, records

    run_dir = tmp_path_factory.mktemp("mp-reference") / "single"
    launch(run_dir, mp_manifest, num_gpus=1).check()
    assert sorted(by_step(records(run_dir), "train/loss")) == list(range(1, STEPS + 1))
    return run_dir
