"""Model quality at equal wall time: Crucible's end-to-end path against a plain Hugging Face Trainer.

Both sides start from the same raw documents and get the same wall-clock budget on this machine,
every stage and process start-up included, and are scored by the same code on the same held-out
documents, which neither trains on.

0. Corpus (common, not counted), read with the project's readers (nothing is filtered):
   ``--corpus news`` (default): English news, the bundled ABC articles (``data/sample/news``) and
   the 2,225 BBC News articles (``--bbc``, by default ``../shared/data/news/bbc`` beside the
   checkout; origin and commit in its SOURCES.md); ``--corpus sample``: the bundled sample as the
   sample recipe reads it (``configs/data/sample.yaml``: raw multilingual Common Crawl as JSON
   lines and WARC pages, their HTML turned into text by the same extractor for both sides, plus
   the ABC news), where the recipe's English-only cleaning removes most of what the held-out
   bytes are made of (see the README). A fixed
   share of the documents (``--heldout-fraction``, chosen by a seeded hash of the text, so
   identical documents fall on the same side) is held out; the rest is written as JSON lines, one
   folder per source, which both sides read.
1. Crucible, as a user runs it: ``launcher/clean.py`` (the sample recipe's cleaning: filters,
   dedup), ``launcher/build_tokenizer.py`` (sentencepiece BPE), ``launcher/shard.py`` (token
   shards), ``launcher/pretrain.py`` (``configs/pretrain/cpu_demo.yaml``: ``cpu-small``, on 1 rank
   here) stopped by SIGTERM when the budget is spent (it saves a checkpoint and exits), then
   ``launcher/consolidate.py`` (the model directory).
2. Peer (a subprocess of this script): a plain Hugging Face ``Trainer`` training
   ``LlamaForCausalLM`` of the identical shape on the raw training documents (no cleaning), with
   its own sentencepiece tokenizer trained the same way (BPE, same vocabulary size, byte
   fallback, split digits, identity normalisation) on its own raw training text: a user without
   Crucible has no cleaned corpus to train one on, and the tokenizer is part of what each path
   produces. Text packed into blocks of ``seq_len + 1`` tokens (``run_clm``'s ``group_texts``).
   A ``TrainerCallback`` stops training when the budget is spent; then ``save_pretrained``.

Same for both: model shape, initialisation std, batch (``--batch-size`` sequences of
``seq_len + 1`` tokens, so the same predicted tokens per step), learning rate, schedule shape
(linear warm-up over ``--warmup-steps``, then constant: the number of steps is not known in
advance at a fixed wall time, so no decay on either side), AdamW betas (0.9, 0.95), eps 1e-8,
weight decay 0.1, gradient clipping 1.0, fp32, threads (``OMP_NUM_THREADS`` and
``torch.set_num_threads``). By default both sides run at the same time, one thread each, over the
same wall-clock interval: whatever else loads the machine loads both alike (``--no-together``:
the peer first, then Crucible, two threads each, which needs an otherwise idle machine). Differences: Crucible trains on its cleaned corpus and may compile
its blocks (``--compile``, on by default as in the GPU recipes; the compilation, or loading it
from inductor's cache, counts against its budget), the Trainer runs eager unless
``--peer-compile``; weight decay groups are each side's own (ours: weight matrices only; the
Trainer's default: everything but biases and norms, embeddings included).

Score: bits per byte = total next-token cross-entropy (nats) / ln 2 / UTF-8 bytes of the held-out
documents. The held-out documents are encoded with each side's tokenizer, EOS after each (and one
EOS in front, so every document token is predicted), packed end to end and cut into windows of
``seq_len`` inputs (the last one shorter); every token of every document is scored once, in
fp32, with each side's final model. Counting bytes of text, not tokens, makes the two tokenizers
comparable.

    python bench/quality.py                         # news corpus, 900 s per side together, ~17 minutes
    python bench/quality.py --budget-seconds 360
    python bench/quality.py --corpus sample         # the bundled multilingual web sample
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# This file is bench/quality.py: keep its folder off sys.path so ``model`` is the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
ROOT = Path(_HERE).parent
sys.path.insert(0, str(ROOT))

PRESET = "cpu-small"
DATA_CONFIG = "configs/data/sample.yaml"
PRETRAIN_RECIPE = "configs/pretrain/cpu_demo.yaml"
EOS_ID = 2


# --------------------------------------------------------------------------- corpus (not counted)

def _is_heldout(text: str, fraction: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}:{text}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def build_corpus(out: Path, args: argparse.Namespace) -> tuple[list[dict], dict[str, int]]:
    """Raw documents of the sample: training ones written to ``out/<source>/train.jsonl``;
    returns the held-out documents ({"source", "text"}) and training documents per source."""
    from crucible.config import load_config
    from data_pipeline.clean.config import SourceConfig
    from data_pipeline.clean.documents import Document
    from data_pipeline.clean.extract import extract_html
    from data_pipeline.clean.readers.inputs import expand_inputs, source_config
    from data_pipeline.clean.readers.registry import read_input
    from data_pipeline.config import DataPrepConfig

    cfg = load_config(DataPrepConfig, ROOT / DATA_CONFIG, [f"input={ROOT / 'data' / 'sample'}"])
    if args.corpus == "news":
        bbc = args.bbc.resolve()
        if not (bbc / "bbc" / "business").is_dir() and not (bbc / "business").is_dir():
            raise SystemExit(f"--corpus news needs the BBC News articles (five topic folders of .txt files): "
                             f"{bbc} has none; pass --bbc <folder> (origin: see ../shared/data/news/bbc/"
                             "SOURCES.md) or use --corpus sample")
        cfg.data.sources = [
            SourceConfig(name="news", path=str(ROOT / "data" / "sample" / "news" / "lee_abc" / "*.cor"),
                         format="lines"),
            SourceConfig(name="bbc", path=str(bbc / "bbc" if (bbc / "bbc").is_dir() else bbc) + "/*/*.txt",
                         format="text"),
        ]
    files, _ = expand_inputs(cfg.data, cfg.input)
    heldout: list[dict] = []
    counts: dict[str, int] = {}
    writers: dict[str, object] = {}
    try:
        for inp in files:
            for rec in read_input(inp, source_config(cfg.data, inp.source), cfg.data.max_doc_bytes):
                if not isinstance(rec, Document):
                    continue  # unreadable records: neither side gets them
                text = rec.text
                if not text and rec.html is not None:
                    try:
                        text = extract_html(rec.html, cfg.data.extract)
                    except Exception as exc:  # noqa: BLE001 - a page over the extraction limits: neither side
                        print(f"corpus: skipped page {rec.id} ({type(exc).__name__}: {exc})", flush=True)
                        continue
                if not text or not text.strip():
                    continue
                if _is_heldout(text, args.heldout_fraction, args.heldout_seed):
                    heldout.append({"source": rec.source, "text": text})
                    continue
                if rec.source not in writers:
                    (out / rec.source).mkdir(parents=True, exist_ok=True)
                    writers[rec.source] = open(out / rec.source / "train.jsonl", "w", encoding="utf-8")  # noqa: SIM115
                writers[rec.source].write(json.dumps({"id": rec.id, "text": text}) + "\n")
                counts[rec.source] = counts.get(rec.source, 0) + 1
    finally:
        for w in writers.values():
            w.close()
    if not heldout:
        raise SystemExit("no held-out documents: raise --heldout-fraction")
    return heldout, counts


# --------------------------------------------------------------------------- Crucible's side

def _env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES="",
               PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run_stage(name: str, cmd: list[str], args: argparse.Namespace, log_dir: Path) -> None:
    with open(log_dir / f"{name}.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(args), stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = (log_dir / f"{name}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"{name} failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def _data_config(corpus: Path, path: Path) -> Path:
    """The sample recipe's settings on a bench corpus folder (one subfolder per source); no
    validation split of our own (the held-out documents are the validation set, and the peer
    trains on all its documents too)."""
    import yaml

    data_cfg = yaml.safe_load((ROOT / DATA_CONFIG).read_text(encoding="utf-8"))
    data_cfg["input"] = str(corpus)
    data_cfg["data"]["sources"] = [{"name": d.name, "path": d.name} for d in sorted(corpus.iterdir())]
    data_cfg.setdefault("shard", {})["validation_fraction"] = 0.0
    path.write_text(yaml.safe_dump(data_cfg), encoding="utf-8")
    return path


def heldout_kept_by_cleaning(work: Path, heldout: list[dict], args: argparse.Namespace) -> list[dict]:
    """The held-out documents (raw text) that the sample recipe's cleaning keeps: a secondary
    score on the text the cleaning aims at (it favours the side that was cleaned; the primary
    score is over every held-out document)."""
    import tarfile

    folder = work / "heldout"
    for i, doc in enumerate(heldout):
        (folder / doc["source"]).mkdir(parents=True, exist_ok=True)
        with open(folder / doc["source"] / "heldout.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": f"heldout-{i}", "text": doc["text"]}) + "\n")
    out = work / "heldout-clean"
    _run_stage("heldout-clean", [sys.executable, "launcher/clean.py", "--config",
                                 str(_data_config(folder, work / "heldout.yaml")), f"output={out}",
                                 f"workers={args.threads}"], args, work)
    kept = set()
    for shard in sorted(out.glob("docs-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    kept.add(json.load(tar.extractfile(member))["id"])
    return [doc for i, doc in enumerate(heldout) if f"heldout-{i}" in kept]


def run_ours(work: Path, corpus: Path, args: argparse.Namespace) -> dict:
    """Clean -> tokenizer -> shards -> pretrain (stopped at the budget) -> model directory, each
    a launcher process, as a user runs them; returns per-stage wall times and the run dir."""
    work.mkdir(parents=True)
    cfg_path = _data_config(corpus, work / "data.yaml")
    clean, tok, shards, run_dir = work / "clean", work / "tokenizer", work / "shards", work / "run"
    py = sys.executable
    stages: dict[str, float] = {}
    t0 = time.monotonic()
    deadline = t0 + args.budget_seconds - args.finish_reserve
    last = t0
    for name, cmd in (
        ("clean", [py, "launcher/clean.py", "--config", str(cfg_path), f"output={clean}", f"workers={args.threads}"]),
        ("tokenizer", [py, "launcher/build_tokenizer.py", "--config", str(cfg_path), f"input={clean}",
                       f"output={tok}", f"tokenizer.num_threads={args.threads}"]),
        ("shards", [py, "launcher/shard.py", "--config", str(cfg_path), f"input={clean}", f"tokenizer_dir={tok}",
                    f"output={shards}", f"shard.workers={args.threads}", f"shard.seq_len={args.seq_len}"]),
    ):
        _run_stage(name, cmd, args, work)
        now = time.monotonic()
        stages[name], last = now - last, now
    overrides = [
        f"run_dir={run_dir}", f"data.manifests=[{shards / 'manifest.json'}]", f"model.preset={PRESET}",
        "train.zero_stage=1", f"train.micro_batch_size={args.batch_size}", "train.grad_accum_steps=1",
        "train.planned_world_size=1", "train.max_steps=100000000", "train.eval_every=0",
        "train.eval_full_at_end=false", f"train.compile={str(args.compile).lower()}", "train.device=cpu",
        f"optim.lr={args.lr}", "optim.weight_decay=0.1", "optim.grad_clip=1.0", "schedule.kind=constant",
        f"schedule.warmup_steps={args.warmup_steps}", "checkpoint.every=0", "log.every=10",
    ]
    cmd = [py, "launcher/pretrain.py", "--config", PRETRAIN_RECIPE, *overrides]
    with open(work / "pretrain.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(args), stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        stop_sent = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the trainer finishes its step, saves and exits 0
        rc = proc.wait()
    if rc != 0:
        tail = (work / "pretrain.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"pretrain failed ({rc}): {' '.join(cmd)}\n{tail}")
    now = time.monotonic()
    stages["pretrain"], stages["  of which SIGTERM to exit (step + save)"], last = now - last, now - stop_sent, now
    _run_stage("consolidate", [py, "launcher/consolidate.py", str(run_dir)], args, work)
    now = time.monotonic()
    stages["consolidate"] = now - last
    latest = json.loads((run_dir / "latest.json").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    first = next((r for r in records if "startup/seconds_to_first_step" in r), {})
    train = [r for r in records if "train/loss" in r]
    return {"stages": stages, "total": now - t0, "steps": int(latest["step"]), "run_dir": str(run_dir),
            "seconds_to_first_step": first.get("startup/seconds_to_first_step", float("nan")),
            "last_logged_loss": train[-1]["train/loss"] if train else float("nan")}


# --------------------------------------------------------------------------- the peer

def peer_main(args: argparse.Namespace) -> None:
    """The peer's whole path, in its own process (start-up and imports count)."""
    marks = {"start": time.time()}
    out, corpus = Path(args.peer_out), Path(args.peer_corpus)
    import sentencepiece as spm
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from model.config import ModelConfig, resolve_model_config
    from model.hf_mapping import to_hf_config

    torch.set_num_threads(args.threads)
    texts = []
    for path in sorted(corpus.glob("*/train.jsonl")):
        with open(path, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    marks["read"] = time.time()

    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True)
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=str(tok_dir / "tokenizer"), model_type="bpe",
        vocab_size=args.vocab_size, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=EOS_ID, pad_id=3, num_threads=args.threads, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    marks["tokenizer"] = time.time()

    block = args.seq_len + 1
    stream: list[int] = []
    for ids in sp.encode(texts, num_threads=args.threads):
        stream += ids
        stream.append(EOS_ID)
    n_blocks = len(stream) // block
    data = torch.tensor(stream[: n_blocks * block], dtype=torch.long).view(n_blocks, block)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n_blocks

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": data[i], "labels": data[i]}

    marks["tokenize + pack"] = time.time()

    cfg = resolve_model_config(ModelConfig(preset=PRESET), vocab_size=sp.get_piece_size())
    hf_cfg = LlamaConfig(**{k: v for k, v in to_hf_config(cfg).items()
                            if k not in ("architectures", "model_type", "dtype", "rope_theta")})
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(hf_cfg)
    deadline = args.peer_deadline

    class StopAtBudget(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if time.time() >= deadline:
                control.should_training_stop = True
            return control

    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=args.lr, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=1.0, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_steps,
        max_steps=100_000_000, logging_steps=10, save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=True, dataloader_num_workers=0, dataloader_pin_memory=False, seed=args.seed, disable_tqdm=True,
        torch_compile=args.peer_compile)
    trainer = Trainer(model=model, args=training_args, train_dataset=Blocks(), callbacks=[StopAtBudget()])
    marks["model + Trainer set-up"] = time.time()
    trainer.train()
    marks["train"] = time.time()
    model.save_pretrained(out / "model")
    marks["save"] = time.time()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    (out / "peer.json").write_text(json.dumps({
        "marks": marks, "steps": trainer.state.global_step, "train_documents": len(texts),
        "train_blocks": n_blocks, "last_logged_loss": losses[-1] if losses else float("nan")}), encoding="utf-8")


def run_peer(work: Path, corpus: Path, args: argparse.Namespace) -> dict:
    start = time.time()
    t0 = time.monotonic()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peer-out", str(work), "--peer-corpus", str(corpus),
           "--peer-deadline", str(start + args.budget_seconds - args.finish_reserve),
           *_shared_flags(args)]
    work.mkdir(parents=True)
    with open(work.parent / "peer.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(args), stdout=log, stderr=subprocess.STDOUT, check=False)
    total = time.monotonic() - t0
    if proc.returncode != 0:
        tail = (work.parent / "peer.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"the peer failed ({proc.returncode}):\n{tail}")
    info = json.loads((work / "peer.json").read_text(encoding="utf-8"))
    marks = info.pop("marks")
    stages, last = {}, start
    for name, at in marks.items():
        if name != "start":
            stages["start-up + read" if name == "read" else name] = at - last
            last = at
    return {**info, "stages": stages, "total": total}


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = [f"--threads={args.threads}", f"--batch-size={args.batch_size}", f"--lr={args.lr}",
             f"--warmup-steps={args.warmup_steps}", f"--seq-len={args.seq_len}", f"--vocab-size={args.vocab_size}",
             f"--seed={args.seed}"]
    return flags + (["--peer-compile"] if args.peer_compile else [])


# --------------------------------------------------------------------------- scoring (same code)

def score(forward, sp_model: Path, docs: list[dict], seq_len: int, batch: int) -> dict[str, dict[str, float]]:
    """Next-token cross-entropy of every token of the held-out documents, packed as described in
    the module docstring; per source and in total: nats, tokens, bytes, bits per byte."""
    import sentencepiece as spm
    import torch
    import torch.nn.functional as F

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    sources = sorted({d["source"] for d in docs})
    stream, owner = [EOS_ID], [-1]
    for doc, ids in zip(docs, sp.encode([d["text"] for d in docs]), strict=True):
        src = sources.index(doc["source"])
        stream += [*ids, EOS_ID]
        owner += [src] * (len(ids) + 1)  # the EOS after a document belongs to it
    tokens = torch.tensor(stream, dtype=torch.long)
    owners = torch.tensor(owner, dtype=torch.long)
    nats = torch.zeros(len(sources), dtype=torch.float64)
    counts = torch.zeros(len(sources), dtype=torch.long)
    starts = list(range(0, len(stream) - 1, seq_len))
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            group = starts[i:i + batch]
            by_len: dict[int, list[int]] = {}
            for s in group:  # the last window is shorter: its own batch
                by_len.setdefault(min(seq_len, len(stream) - 1 - s), []).append(s)
            for length, ss in by_len.items():
                inp = torch.stack([tokens[s:s + length] for s in ss])
                tgt = torch.stack([tokens[s + 1:s + 1 + length] for s in ss])
                own = torch.stack([owners[s + 1:s + 1 + length] for s in ss])
                logits = forward(inp).float()
                loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").double()
                nats.index_add_(0, own.flatten(), loss)
                counts.index_add_(0, own.flatten(), torch.ones_like(own.flatten()))
    out = {}
    for k, name in enumerate(sources):
        n_bytes = sum(len(d["text"].encode("utf-8", "surrogatepass")) for d in docs if d["source"] == name)
        out[name] = {"nats": nats[k].item(), "tokens": int(counts[k]), "bytes": n_bytes}
    out["all"] = {key: sum(v[key] for v in out.values()) for key in ("nats", "tokens", "bytes")}
    for v in out.values():
        v["bits_per_byte"] = v["nats"] / math.log(2) / v["bytes"]
    return out


def score_ours(run_dir: Path, docs: list[dict], args: argparse.Namespace) -> dict:
    from model.io import load_model_dir

    model, _ = load_model_dir(run_dir)
    model.float().eval()
    return score(lambda x: model(x), run_dir / "tokenizer" / "tokenizer.model", docs, args.seq_len, args.batch_size)


def score_peer(peer_dir: Path, docs: list[dict], args: argparse.Namespace) -> dict:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(peer_dir / "model", dtype="float32").eval()
    return score(lambda x: model(input_ids=x).logits, peer_dir / "tokenizer" / "tokenizer.model", docs,
                 args.seq_len, args.batch_size)


# --------------------------------------------------------------------------- report

def report(args: argparse.Namespace, corpus_s: float, counts: dict[str, int], heldout: list[dict],
           ours: dict, peer: dict, s_ours: dict, s_peer: dict) -> None:
    together = "both sides at the same time" if args.together else "one side after the other"
    print(f"\n== quality at equal wall time: budget {args.budget_seconds:.0f} s per side (every stage and "
          f"process start-up; {together}), {args.threads} thread(s) each, {PRESET}, batch {args.batch_size} x "
          f"{args.seq_len + 1} tokens, lr {args.lr} (warm-up {args.warmup_steps} steps, then constant)")
    print(f"corpus (common, not counted): {corpus_s:.1f} s; training documents "
          f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}; held out {len(heldout)} documents "
          f"({s_ours['all']['bytes']:,} UTF-8 bytes)")
    compile_ours = "on" if args.compile else "off"
    for name, side in ((f"Crucible (clean -> tokenizer -> shards -> pretrain, compile {compile_ours})", ours),
                       (f"HF Trainer + LlamaForCausalLM (raw text{', torch_compile' if args.peer_compile else ''})",
                        peer)):
        print(f"{name}: total {side['total']:.1f} s")
        for stage, sec in side["stages"].items():
            print(f"    {stage:32s} {sec:8.1f} s")
    print(f"Crucible's pretrain process: start-up to its first step {ours['seconds_to_first_step']:.1f} s "
          "(with compile on, the blocks' compilation then runs in that step)")
    tokens = {k: v["steps"] * args.batch_size * args.seq_len for k, v in (("ours", ours), ("peer", peer))}
    print(f"{'':28s} {'steps':>7s} {'tokens seen':>12s} {'last train loss*':>17s} {'held-out tokens':>16s} "
          f"{'bytes':>9s} {'bits/byte':>10s}")
    for name, side, sc, key in (("Crucible", ours, s_ours, "ours"), ("HF Trainer", peer, s_peer, "peer")):
        print(f"{name:28s} {side['steps']:7d} {tokens[key]:12,d} {side['last_logged_loss']:17.4f} "
              f"{sc['all']['tokens']:16,d} {sc['all']['bytes']:9,d} {sc['all']['bits_per_byte']:10.4f}")
    for src in sorted(k for k in s_ours if k != "all"):
        print(f"    held-out {src:18s} bytes {s_ours[src]['bytes']:9,d}: bits/byte Crucible "
              f"{s_ours[src]['bits_per_byte']:.4f}, HF Trainer {s_peer[src]['bits_per_byte']:.4f} "
              f"(ratio {s_peer[src]['bits_per_byte'] / s_ours[src]['bits_per_byte']:.3f})")
    print("* on each side's own training data and tokenizer: not comparable; bits per byte on the held-out "
          "text is")
    ratio = s_peer["all"]["bits_per_byte"] / s_ours["all"]["bits_per_byte"]
    verdict = "Crucible wins" if ratio > 1 else "Crucible does NOT win"
    print(f"ratio HF Trainer bits/byte / Crucible bits/byte: {ratio:.3f} ({verdict}: > 1 means a better "
          "model from Crucible in the same wall time)")
    if ours["total"] > args.budget_seconds or peer["total"] > args.budget_seconds:
        print(f"note: a side ran past the budget (Crucible {ours['total']:.1f} s, HF Trainer {peer['total']:.1f} s): "
              "its last step and save after the stop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-seconds", type=float, default=900.0,
                        help="wall-clock budget of each side, every stage and start-up included")
    parser.add_argument("--finish-reserve", type=float, default=8.0,
                        help="seconds before the end of the budget at which each side stops training, for "
                             "what follows (ours: save + consolidate; the peer: save_pretrained)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of each side (default: 1 when the sides run together, 2 one after the other)")
    parser.add_argument("--together", action=argparse.BooleanOptionalAction, default=True,
                        help="run both sides at the same time, one thread each (default), so that whatever else "
                             "loads the machine loads both alike; --no-together: the peer first, then Crucible")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (both sides)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cpu_demo.yaml's)")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens predicted per sequence; must match "
                        "the token shards of the sample recipe (shard.seq_len)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="the peer's tokenizer (ours: the sample "
                        "recipe's tokenizer.vocab_size)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--corpus", choices=("news", "sample"), default="news",
                        help="news: English news articles, the bundled ABC ones and BBC News (--bbc); sample: "
                             "the bundled sample as the sample recipe reads it (raw multilingual Common Crawl "
                             "+ ABC news)")
    parser.add_argument("--bbc", type=Path, default=ROOT.parent / "shared" / "data" / "news" / "bbc",
                        help="BBC News folder for --corpus news (default: ../shared/data/news/bbc beside the "
                             "checkout)")
    parser.add_argument("--heldout-fraction", type=float, default=0.05)
    parser.add_argument("--heldout-seed", type=int, default=0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="Crucible's train.compile")
    parser.add_argument("--peer-compile", action="store_true", help="the Trainer's torch_compile")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-quality"),
                        help="work folder (relative: to the repository root); deleted and rebuilt")
    parser.add_argument("--peer-out", help=argparse.SUPPRESS)
    parser.add_argument("--peer-corpus", help=argparse.SUPPRESS)
    parser.add_argument("--peer-deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 1 if args.together else 2
    if args.peer_out:
        peer_main(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = args.work if args.work.is_absolute() else ROOT / args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.monotonic()
    heldout, counts = build_corpus(work / "corpus", args)
    corpus_s = time.monotonic() - start
    print(f"corpus: {sum(counts.values())} training and {len(heldout)} held-out documents ({corpus_s:.1f} s)",
          flush=True)
    if args.together:  # both budgets run over the same wall-clock interval
        import threading

        result: dict[str, object] = {}

        def peer_side() -> None:
            try:
                result["peer"] = run_peer(work / "peer", work / "corpus", args)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                result["error"] = exc

        thread = threading.Thread(target=peer_side)
        thread.start()
        ours = run_ours(work / "ours", work / "corpus", args)
        thread.join()
        if "error" in result:
            raise result["error"]
        peer = result["peer"]
    else:
        peer = run_peer(work / "peer", work / "corpus", args)
        ours = run_ours(work / "ours", work / "corpus", args)
    print(f"peer: {peer['steps']} steps in {peer['total']:.1f} s", flush=True)
    print(f"ours: {ours['steps']} steps in {ours['total']:.1f} s", flush=True)
    s_peer = score_peer(work / "peer", heldout, args)
    s_ours = score_ours(Path(ours["run_dir"]), heldout, args)
    kept = heldout_kept_by_cleaning(work, heldout, args)
    k_peer = score_peer(work / "peer", kept, args)["all"] if kept else None
    k_ours = score_ours(Path(ours["run_dir"]), kept, args)["all"] if kept else None
    report(args, corpus_s, counts, heldout, ours, peer, s_ours, s_peer)
    if kept:
        print(f"secondary: the {len(kept)} held-out documents ({k_ours['bytes']:,} bytes) the cleaning keeps (raw "
              f"text; a subset chosen by our own filters, so it favours Crucible): bits/byte Crucible "
              f"{k_ours['bits_per_byte']:.4f}, HF Trainer {k_peer['bits_per_byte']:.4f} "
              f"(ratio {k_peer['bits_per_byte'] / k_ours['bits_per_byte']:.3f})")


if __name__ == "__main__":
    main()
