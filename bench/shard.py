"""Token-shard writing throughput beside its limit, raw sentencepiece batch encoding.

    python bench/shard.py --text ../shared/data/news/bbc --mb 20 --threads 2

Reads every ``*.txt`` (one document per file) and ``*.jsonl[.gz]`` (``text`` field) under
``--text``, repeats the corpus up to ``--mb`` megabytes, trains (or loads, ``--tokenizer``) a
BPE tokenizer, then times in the same process, alternating, best of ``--repeats``:

* limit: ``SentencePieceProcessor.encode(batch, num_threads=T)`` over the same batches;
* ours: ``write_token_shards`` (split long documents, encode with the same threads, append EOS,
  pack, validation split, write tars, sha256, manifest).

Prints MB/s of UTF-8 text for both and the ratio (target: at least 0.8).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def read_texts(folder: Path) -> list[str]:
    texts: list[str] = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() == ".txt" and path.name.lower() != "readme.txt":
            raw = path.read_bytes()
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append(raw.decode("latin-1"))
        elif path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                texts.extend(json.loads(line)["text"] for line in f if line.strip())
    if not texts:
        raise SystemExit(f"no .txt or .jsonl documents under {folder}")
    return texts


def corpus(folder: Path, megabytes: float) -> list[str]:
    base = read_texts(folder)
    out: list[str] = []
    size = 0
    while size < megabytes * 1e6:
        for t in base:
            out.append(t)
            size += len(t.encode("utf-8"))
            if size >= megabytes * 1e6:
                break
    return out


def ensure_tokenizer(texts: list[str], tokenizer: Path | None, work: Path, vocab: int) -> Path:
    from data_pipeline.tokenizer.config import TokenizerConfig
    from data_pipeline.tokenizer.train import train_tokenizer

    if tokenizer is not None:
        return tokenizer
    out = work / "tokenizer"
    train_tokenizer(texts, TokenizerConfig(vocab_size=vocab, sample_documents=5000), out)
    return out


def time_limit(sp, texts: list[str], batch: int, threads: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        sp.encode(texts[i:i + batch], num_threads=threads)
    return time.perf_counter() - start


def time_ours(texts: list[str], tok: Path, out: Path, batch: int, threads: int, seq_len: int) -> float:
    from data_pipeline.shards.config import ShardConfig
    from data_pipeline.shards.writer import write_token_shards

    cfg = ShardConfig(seq_len=seq_len, workers=threads, batch_documents=batch)
    start = time.perf_counter()
    write_token_shards(texts, tok, out, cfg)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "news" / "bbc",
                    help="folder of news text (default: ../shared/data/news/bbc beside the checkout)")
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024, help="documents per encode batch")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import sentencepiece as spm

    texts = corpus(args.text, args.mb)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = ensure_tokenizer(texts, args.tokenizer, work, args.vocab)
        sp = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
        limit, ours = [], []
        for _ in range(args.repeats):
            limit.append(time_limit(sp, texts, args.batch, args.threads))
            ours.append(time_ours(texts, tok, work / "shards", args.batch, args.threads, args.seq_len))
        manifest = json.loads((work / "shards" / "manifest.json").read_text())
    best_limit, best_ours = mb / min(limit), mb / min(ours)
    tokens = manifest["totals"]["train"]["tokens_in"] + manifest["totals"]["validation"]["tokens_in"]
    print(f"corpus: {len(texts)} documents, {mb:.1f} MB, {tokens / 1e6:.2f} M tokens, "
          f"threads {args.threads}, batch {args.batch}, seq_len {args.seq_len}")
    print(f"sentencepiece batch encode (limit): {best_limit:7.2f} MB/s")
    print(f"tokenize + pack + write (ours):     {best_ours:7.2f} MB/s")
    print(f"ratio ours / limit:                 {best_ours / best_limit:7.2f}x  (target >= 0.8)")


if __name__ == "__main__":
    main()
