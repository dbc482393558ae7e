"""Small real datasets built from data/sample/ for tests (shared with the training tests).

``make_token_dataset`` trains a tiny tokenizer on the English sample text and writes token
shards; use it from a session-scoped fixture::

    @pytest.fixture(scope="session")
    def token_manifest(tmp_path_factory):
        return make_token_dataset(tmp_path_factory.mktemp("tokens"))
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"


def sample_texts(sample_dir: Path = SAMPLE) -> Iterator[str]:
    """English sample documents in a fixed order: Dolma/CCNet JSON lines, then ABC news lines.

    (The large multilingual Common Crawl file is left out so a 512-piece vocabulary can cover
    the characters.) The Lee corpus is Latin-1, not UTF-8.
    """
    for path in sorted((sample_dir / "web" / "dolma_cc").glob("*.json*")):
        if path.name.startswith("CC-MAIN"):
            continue
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
    for path in sorted((sample_dir / "news" / "lee_abc").glob("*.cor")):
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.strip():
                yield line.strip()


def make_token_dataset(
    out_dir: Path, seq_len: int = 64, vocab_size: int = 512, samples_per_shard: int = 128,
    validation_fraction: float = 0.05,
) -> Path:
    """Tokenizer in ``out_dir/tokenizer``, token shards in ``out_dir/shards``; returns the manifest.

    Idempotent: returns at once when the manifest already exists.
    """
    from data_pipeline.shards.config import ShardConfig
    from data_pipeline.shards.writer import write_token_shards
    from data_pipeline.tokenizer.config import TokenizerConfig
    from data_pipeline.tokenizer.folder import is_complete
    from data_pipeline.tokenizer.train import train_tokenizer

    out_dir = Path(out_dir)
    manifest = out_dir / "shards" / "manifest.json"
    if manifest.is_file():
        return manifest
    tok_dir = out_dir / "tokenizer"
    if not is_complete(tok_dir):
        train_tokenizer(sample_texts(), TokenizerConfig(vocab_size=vocab_size, heldout_documents=20),
                        tok_dir)
    cfg = ShardConfig(seq_len=seq_len, samples_per_shard=samples_per_shard,
                      validation_fraction=validation_fraction)
    write_token_shards(sample_texts(), tok_dir, out_dir / "shards", cfg)
    return manifest


def shared_token_dataset(tmp_path_factory) -> Path:
    """One token dataset per test session (every test file asking for it shares the folder)."""
    return make_token_dataset(tmp_path_factory.getbasetemp() / "token_dataset")


def read_split_samples(manifest_path: Path, split: str = "train") -> list[bytes]:
    """Every sample of a split, in shard order, read with plain webdataset (an independent reader)."""
    from webdataset.tariterators import tarfile_to_samples

    manifest = json.loads(Path(manifest_path).read_text())
    base = Path(manifest_path).parent
    samples = []
    for entry in manifest["splits"][split]:
        for sample in tarfile_to_samples()([{"url": str(base / entry["path"])}]):
            samples.append(sample["tokens"])
    return samples
