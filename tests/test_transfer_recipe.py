"""The CPU transfer recipe (configs/data/transfer.yaml, configs/pretrain/cpu_transfer.yaml) loads
and validates, reads its sources by relative path, keeps SST-2's labels out of the corpus and
leaves the fine-tune sets it is measured on out of it."""

from __future__ import annotations

from pathlib import Path

from crucible.config import load_config
from data_pipeline.clean.config import CleanConfig
from data_pipeline.clean.documents import Document
from data_pipeline.clean.readers.inputs import expand_inputs, source_config
from data_pipeline.clean.readers.registry import read_input
from data_pipeline.config import DataPrepConfig
from training.config import PretrainConfig

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "configs" / "data" / "transfer.yaml"
PRETRAIN = ROOT / "configs" / "pretrain" / "cpu_transfer.yaml"


def test_transfer_recipes_load_and_fit_together():
    data = load_config(DataPrepConfig, DATA)
    pre = load_config(PretrainConfig, PRETRAIN)
    assert not Path(data.input).is_absolute()
    assert all(not Path(s.path).is_absolute() for s in data.data.sources)
    # the fine-tune sets the recipe is evaluated on are not part of its corpus
    assert not any(k in s.path for s in data.data.sources for k in ("uci_sentiment", "wikigold", "ner_"))
    # the pretraining reads the shards prepare_data writes, at their sequence length
    assert pre.data.manifests == [f"{data.output}/shards/manifest.json"]
    assert pre.model.max_seq_len == data.shard.seq_len
    assert pre.schedule.kind == "cosine" and pre.schedule.warmup_steps < pre.train.max_steps


def test_sst2_source_reads_the_sentence_column_only(tmp_path):
    """SST-2 is used as unlabelled text: the label column must not reach the documents."""
    data = load_config(DataPrepConfig, DATA)
    sst = next(s for s in data.data.sources if s.name == "sst2_unlabelled")
    tsv = tmp_path / "train.tsv"
    tsv.write_text("label\tsentence\n0\ta dull , lifeless film\n1\tan utterly charming ride\n", encoding="utf-8")
    cfg = CleanConfig(sources=[sst.model_copy(update={"path": str(tsv)})])
    files, _ = expand_inputs(cfg, None)
    docs = [r for f in files for r in read_input(f, source_config(cfg, sst.name), cfg.max_doc_bytes)
            if isinstance(r, Document)]
    assert [d.text for d in docs] == ["a dull , lifeless film", "an utterly charming ride"]
