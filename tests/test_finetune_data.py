"""Fine-tune data: readers, label maps, bad-data errors, word/sub-word alignment, QA offsets."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from crucible.errors import DataError
from training.tasks import classification, qa, token_classification
from training.tasks.config import TaskConfig
from training.tasks.data import load_task_data, read_conll, read_squad

ROOT = Path(__file__).resolve().parent.parent
FT = ROOT / "data" / "sample" / "finetune"
NER = FT / "ner_wnut17_wikigold"


@pytest.fixture(scope="module")
def tokenizer():
    return build_test_tokenizer()


def build_test_tokenizer():
    """A sentencepiece-style (Metaspace, byte-fallback BPE) fast tokenizer trained on sample text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace()
    texts = (ROOT / "data/sample/news/lee_abc/lee_background.cor").read_text().splitlines()
    texts += [w.split("\t")[0] for w in (NER / "WNUT17/train/wnut17train.conll").read_text().splitlines()[:20000]]
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz")))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def _sentiment_cfg(**kw) -> TaskConfig:
    return TaskConfig(kind="classification", format="tsv", train=str(FT / "uci_sentiment/imdb_labelled.txt"),
                      columns=["text", "label"], **kw)


def test_classification_hash_split_is_stable_and_disjoint():
    a, b = load_task_data(_sentiment_cfg()), load_task_data(_sentiment_cfg())
    assert a.labels == ["0", "1"]
    assert len(a.train) + len(a.dev) + len(a.test) == 1000
    assert a.dev["text"] == b.dev["text"] and a.test["text"] == b.test["text"]
    assert not set(a.dev["text"]) & set(a.test["text"])
    assert 50 < len(a.test) < 150


def test_missing_column_is_a_clear_error():
    with pytest.raises(DataError, match=r"column\(s\) \['sentence'\] not found.*columns \['text', 'label'\]"):
        load_task_data(_sentiment_cfg(text_column="sentence"))


def test_unseen_label_in_dev_is_an_error(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\ngood\tpos\nbad\tneg\n")
    (tmp_path / "dev.tsv").write_text("text\tlabel\nmeh\tneutral\n")
    cfg = TaskConfig(train=str(tmp_path / "train.tsv"), dev=str(tmp_path / "dev.tsv"),
                     test=str(tmp_path / "train.tsv"))
    with pytest.raises(DataError, match=r"dev split .* label\(s\) \['neutral'\] that never occur"):
        load_task_data(cfg)


@pytest.mark.parametrize("fmt,content,needle", [
    ("csv", "", r"empty.csv is empty \(0 bytes\): a CSV file of task examples needs a header row"),
    ("csv", "\n\n", r"empty.csv is empty \(only blank lines\)"),
    ("tsv", "text\tlabel\n", r"empty.tsv has a header row but no examples"),
    ("jsonl", "", r"empty.jsonl is empty \(0 bytes\): a JSON lines file"),
])
def test_empty_file_is_named_as_empty(tmp_path, fmt, content, needle):
    """Not datasets' "An error occurred while generating the dataset": the file and what is wrong."""
    train = tmp_path / f"train.{fmt}"
    train.write_text('{"text": "good", "label": "pos"}\n' if fmt == "jsonl" else
                     "text{0}label\ngood{0}pos\n".format("\t" if fmt == "tsv" else ","))
    (tmp_path / f"empty.{fmt}").write_text(content)
    cfg = TaskConfig(format=fmt, train=str(train), dev=str(tmp_path / f"empty.{fmt}"), test=str(train))
    with pytest.raises(DataError, match=needle):
        load_task_data(cfg)
    with pytest.raises(DataError, match=needle):  # as the training file too
        load_task_data(cfg.model_copy(update={"train": cfg.dev}))


def test_malformed_files_name_the_problem(tmp_path):
    (tmp_path / "empty.conll").write_text("\n-DOCSTART- O\n\n")
    with pytest.raises(DataError, match="empty.conll holds no sentences"):
        read_conll(tmp_path / "empty.conll")
    train = tmp_path / "train.csv"
    train.write_text("text,label\ngood,pos\nbad,\n")
    with pytest.raises(DataError, match=r"train.csv: example 2 has an empty 'label'"):
        load_task_data(TaskConfig(format="csv", train=str(train)))
    # pandas would silently read "good" as an index and " fun film" as the text
    train.write_text("text,label\ngood, fun film,pos\nbad,neg\n")
    with pytest.raises(DataError, match=r"first example has 3 fields but the header row has 2: a comma inside"):
        load_task_data(TaskConfig(format="csv", train=str(train)))
    train.write_text('text,label\n"unclosed,pos\n')
    with pytest.raises(DataError, match=r"could not read .*train.csv as CSV: ParserError: .*EOF inside string"):
        load_task_data(TaskConfig(format="csv", train=str(train)))


def _topics_csv(path: Path) -> Path:
    rows = ["text,label"] + [f"match report {i},sports" for i in range(400)]
    rows += [f"vote count {i},politics" for i in range(300)]
    rows += ["cup final,Sports", "derby day,Sports", "new phone,tech"]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_training_label_typos_are_warned(tmp_path):
    from training.tasks.classification import ClassificationTask
    from training.tasks.labels import label_table

    cfg = TaskConfig(format="csv", train=str(_topics_csv(tmp_path / "topics.csv")), split_fractions=(0.0, 0.0))
    cfg = cfg.model_copy(update={"dev": cfg.train, "test": cfg.train})
    data = load_task_data(cfg)
    task = ClassificationTask(cfg)
    counts = task.label_counts(data.train)
    assert counts == {"sports": 400, "politics": 300, "Sports": 2, "tech": 1}
    warnings = task.label_warnings(counts)
    assert len(warnings) == 3, warnings
    assert "label 'tech' is seen only 1 time" in warnings[0] and "'sports', 400 times" in warnings[0]
    assert "label 'Sports' is seen only 2 times" in warnings[1]
    assert "labels 'Sports' (2) and 'sports' (400) differ only by case" in warnings[2]
    table = label_table(counts, data.labels, task.label_unit, "topics.csv")
    assert table.splitlines()[0] == "training labels (topics.csv): 4 labels over 703 examples"
    assert any(line.split()[1:3] == ["sports", "400"] for line in table.splitlines()[1:])
    # a small set where every label is seen a few times is not flagged, nor are balanced labels
    assert task.label_warnings(Counter({"a": 3, "b": 2, "c": 1})) == []
    assert task.label_warnings(Counter({"0": 500, "1": 480})) == []


def test_bio_tag_typos_are_warned(tmp_path):
    from training.tasks.token_classification import TokenClassificationTask

    sentences = ["Paris B-LOC\nis O\nnice O\n"] * 120 + ["John B-PER\nSmith I-PER\nleft O\n"] * 60
    sentences += ["Rome B-LCO\nwins O\n", "Acme I-ORG\nCorp I-ORG\n"]
    (tmp_path / "train.conll").write_text("\n".join(sentences))
    task = TokenClassificationTask(TaskConfig(kind="token_classification", format="conll"))
    counts = task.label_counts(read_conll(tmp_path / "train.conll"))
    assert counts["B-LCO"] == 1 and counts["O"] == 301 and task.label_unit == "words"
    warnings = task.label_warnings(counts)
    assert any(w.startswith("entity type 'LCO' is tagged on only 1 token (B-LCO 1;") for w in warnings), warnings
    assert any(w.startswith("entity type 'ORG' is tagged on only 2 tokens") for w in warnings), warnings
    assert any(w.startswith("I-ORG occurs 2 times but B-ORG never") for w in warnings), warnings
    assert not any("'LOC'" in w or "'PER'" in w for w in warnings)
    # the bundled WNUT-17 tags (rarest: I-corporation 46) and IOB1 wikigold (no B- tags) are clean
    assert task.label_warnings(task.label_counts(read_conll(NER / "WNUT17/train/wnut17train.conll"))) == []
    assert task.label_warnings(task.label_counts(read_conll(NER / "wikigold/wikigold.conll.txt"))) == []


def test_fine_tuning_logs_the_label_set_and_its_warnings_once(tmp_path, caplog):
    import logging

    import torch

    from training.engine import DistContext
    from training.steps.task import TaskStep
    from training.tasks.config import FinetuneConfig

    train = str(_topics_csv(tmp_path / "topics.csv"))
    cfg = FinetuneConfig(init_from=str(tmp_path), task=TaskConfig(format="csv", train=train, dev=train, test=train))
    data = load_task_data(cfg.task)
    with caplog.at_level(logging.INFO, logger="crucible.training.task"):
        for rank in (0, 1):
            TaskStep(cfg, DistContext(rank, 2, rank, torch.device("cpu")), data)
    records = [r for r in caplog.records if r.name == "crucible.training.task"]
    assert [r.levelname for r in records] == ["INFO", "WARNING"]  # rank 0 only, one block each
    table, warnings = records[0].getMessage(), records[1].getMessage()
    assert table.startswith(f"training labels ({train}): 4 labels over 703 examples")
    assert len(table.splitlines()) == 5 and "politics" in table
    assert warnings.startswith(f"training labels that may be typos ({train}):")
    assert "'Sports' (2) and 'sports' (400) differ only by case" in warnings and "'tech'" in warnings


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="task.train file .* does not exist"):
        load_task_data(TaskConfig(train=str(tmp_path / "nope.tsv")))


def test_conll_reader_and_bio_label_map():
    cfg = TaskConfig(kind="token_classification", format="conll",
                     train=str(NER / "WNUT17/train/wnut17train.conll"),
                     dev=str(NER / "WNUT17/dev/emerging.dev.conll"),
                     test=str(NER / "WNUT17/test/emerging.test.annotated"))
    data = load_task_data(cfg)
    assert len(data.train) == 3394 and data.labels[0] == "O"
    assert {"B-person", "I-person", "B-location"} <= set(data.labels)
    assert all(len(r["tokens"]) == len(r["tags"]) for r in data.dev)


def test_malformed_conll_line(tmp_path):
    (tmp_path / "bad.conll").write_text("word\tO\nlonely\n")
    with pytest.raises(DataError, match=r"bad.conll:2: expected a word and a tag"):
        read_conll(tmp_path / "bad.conll")


def test_word_subword_alignment_round_trips_on_conll(tokenizer):
    ds = read_conll(NER / "wikigold/wikigold.conll.txt").select(range(300))
    labels = sorted({t for row in ds["tags"] for t in row})
    feats = ds.map(lambda b: token_classification.featurize(b, tokenizer, 512, labels),
                   batched=True, remove_columns=ds.column_names)
    for row, feat in zip(ds, feats):
        assert feat["truncated_words"] == 0
        # every word owns exactly one labelled sub-word, in order
        positions = feat["word_index"]
        assert positions == sorted(positions) and len(set(positions)) == len(row["tokens"])
        labelled = [i for i, t in enumerate(feat["target"]) if t != token_classification.IGNORE]
        assert labelled == positions
        # gold labels on first sub-words map back to exactly the word tags
        pred = [t if t != token_classification.IGNORE else 0 for t in feat["target"]]
        assert token_classification.words_from_predictions(pred, positions, labels) == row["tags"]


def test_alignment_truncation_is_counted(tokenizer):
    words = ["alpha"] * 50
    feats = token_classification.featurize({"tokens": [words], "tags": [["O"] * 50]}, tokenizer, 20, ["O"])
    assert feats["truncated_words"][0] > 0
    assert len(feats["input_ids"][0]) == 20
    tags = token_classification.words_from_predictions([0] * 20, feats["word_index"][0], ["O"])
    assert len(tags) == 50


def test_qa_offsets_recover_gold_answers(tokenizer):
    ds = read_squad(FT / "xquad_en/xquad.en.json")
    assert len(ds) == 1190
    # with the column types the QA task declares (datasets.map refuses rows that do not fit them)
    types = qa.QuestionAnsweringTask(TaskConfig(kind="qa", format="squad")).feature_types()
    feats = ds.map(lambda b: qa.featurize(b, tokenizer, 384, 128, eos_id=2), batched=True,
                   remove_columns=ds.column_names, features=types)
    assert feats.features == types
    by_id = {r["id"]: r for r in ds}
    recovered, aligned_examples = 0, set()
    for f in feats:
        if f["start"] == 0:
            continue
        ex = by_id[f["example_id"]]
        c0 = f["context_start"]
        s_char = f["offsets"][f["start"] - c0][0]
        e_char = f["offsets"][f["end"] - c0][1]
        if f["answer_aligned"]:
            a, b = qa.trim_span(ex["context"], s_char, e_char)
            gold = ex["answers"]["text"][0]
            assert gold in (ex["context"][s_char:e_char], ex["context"][a:b])
            aligned_examples.add(f["example_id"])
        else:
            assert ex["answers"]["text"][0] in ex["context"][s_char:e_char]
    recovered = len(aligned_examples)
    unaligned = sum(1 for r in ds if r["id"] not in aligned_examples)
    print(f"QA answers recovered from token positions: {recovered}/{len(ds)}; "
          f"not on token boundaries: {unaligned}")
    assert recovered / len(ds) >= 0.99


def test_qa_long_context_windows_overlap(tokenizer):
    context = " ".join(f"word{i}" for i in range(400)) + " the answer is Canberra today."
    start = context.index("Canberra")
    batch = {"id": ["q"], "question": ["Where?"], "context": [context],
             "answers": [{"text": ["Canberra"], "answer_start": [start]}]}
    feats = qa.featurize(batch, tokenizer, 64, 16, eos_id=2)
    n = len(feats["input_ids"])
    assert n > 3 and all(len(ids) <= 64 for ids in feats["input_ids"])
    hits = [i for i in range(n) if feats["start"][i] > 0]
    assert hits, "some window must contain the answer"
    # decoding from logits peaked on the gold positions returns the exact answer text
    starts, ends = [], []
    for i in range(n):
        s = np.full(len(feats["input_ids"][i]), -5.0)
        e = s.copy()
        if i == hits[0]:
            s[feats["start"][i]], e[feats["end"][i]] = 5.0, 5.0
        starts.append(s)
        ends.append(e)
    rows = [{k: feats[k][i] for k in feats} for i in range(n)]
    answers = qa.decode_answers(starts, ends, rows, {"q": context}, n_best=5, max_answer_length=10)
    assert answers == {"q": "Canberra"}


def test_squad_metrics():
    m = qa.compute_metrics({"a": "the Eiffel Tower", "b": "Paris France"},
                           {"a": ["Eiffel Tower"], "b": ["Paris"]})
    assert m["exact_match"] == 50.0 and m["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_classification_features_and_metrics(tokenizer):
    cfg = _sentiment_cfg(max_length=16)
    data = load_task_data(cfg)
    feats = data.test.map(lambda b: classification.featurize(b, tokenizer, cfg, data.labels, 2),
                          batched=True)
    assert all(ids[-1] == 2 and len(ids) <= 16 for ids in feats["input_ids"])
    assert any(feats["truncated"])
    targets = np.array(feats["target"])
    logits = np.stack([1 - targets[:, 0], targets[:, 0]], axis=1)
    assert classification.compute_metrics(logits, targets, cfg, data.labels) == {"accuracy": 1.0, "macro_f1": 1.0}
    assert 0.5 <= classification.majority_rate(targets) < 0.7
