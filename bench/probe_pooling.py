"""Which token's features carry the task? A linear probe on frozen backbone features.

    python bench/probe_pooling.py --models runs/transfer/pretrain300 runs/transfer/pretrain1500 \
        [--task uci_sentiment] [--seed 0]

For each model (a pretraining run directory, its newest complete checkpoint) and for a random
initialisation of the same shape (``--seed``), the script featurises the recipe's train/dev/test
splits exactly as the fine-tune does (``training.tasks``: sentence tokens, then EOS), reads the
final-normed hidden states with the backbone frozen, and fits a logistic regression
(scikit-learn, C chosen on dev) on three poolings:

- ``eos``: the hidden state at the appended EOS token, the one the classification head pools
  (``model/heads.py``: last non-pad token);
- ``last_word``: the hidden state at the last sentence token (the one before EOS);
- ``mean``: the mean over the sentence tokens and EOS.

It prints dev and test accuracy per model and pooling. A probe is a diagnosis, not the
benchmark (``bench/finetune_evidence.py`` fine-tunes the whole network): it shows how much of
the task a frozen network already separates linearly at each position.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def features(backbone: torch.nn.Module, rows: list[dict], pad_id: int, batch: int = 64) -> dict[str, np.ndarray]:
    """Pooled frozen features of every row: eos, last_word, mean."""
    out: dict[str, list[np.ndarray]] = {"eos": [], "last_word": [], "mean": []}
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = [r["input_ids"] for r in rows[i: i + batch]]
            width = max(len(ids) for ids in chunk)
            tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for j, ids in enumerate(chunk):
                tokens[j, : len(ids)] = torch.tensor(ids)
            hidden = backbone.hidden_states(tokens)
            lengths = torch.tensor([len(ids) for ids in chunk])
            idx = torch.arange(len(chunk))
            out["eos"].append(hidden[idx, lengths - 1].numpy())
            out["last_word"].append(hidden[idx, (lengths - 2).clamp(min=0)].numpy())
            real = (torch.arange(width)[None, :] < lengths[:, None]).float()
            out["mean"].append(((hidden * real[..., None]).sum(1) / lengths[:, None]).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def probe(train: np.ndarray, y_train: np.ndarray, dev: np.ndarray, y_dev: np.ndarray,
          test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Logistic regression on standardised features; C picked by dev accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    train, dev, test = scaler.transform(train), scaler.transform(dev), scaler.transform(test)
    best = None
    for c in (0.01, 0.1, 1.0, 10.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(train, y_train)
        acc = clf.score(dev, y_dev)
        if best is None or acc > best[0]:
            best = (acc, c, clf.score(test, y_test))
    return {"dev": best[0], "test": best[2], "C": best[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="pretraining run directories")
    parser.add_argument("--task", default="uci_sentiment", help="classification recipe under configs/finetune")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = parser.parse_args()

    import yaml

    from model.io import load_model_dir
    from model.transformer import Transformer
    from training.tasks.config import TaskConfig
    from training.tasks.data import load_task_data
    from training.tasks.features import feature_rows, featurize, find_init_model, load_tokenizer
    from training.tasks.registry import task_kind

    recipe = yaml.safe_load((ROOT / "configs" / "finetune" / f"{args.task}.yaml").read_text())
    task_cfg = TaskConfig(**recipe["task"])
    if task_cfg.kind != "classification":
        parser.error(f"--task {args.task}: the probe reads sentence classification recipes, not {task_cfg.kind}")
    data = load_task_data(task_cfg)
    task = task_kind(task_cfg)
    results = {}
    inits = [(str(m), m, False) for m in args.models] + [(f"random (seed {args.seed})", args.models[0], True)]
    for name, run, random_init in inits:
        model_dir = find_init_model(run)
        tokenizer = load_tokenizer(model_dir)
        feats = featurize(data, task, tokenizer)
        backbone, model_cfg = load_model_dir(model_dir)
        if random_init:
            torch.manual_seed(args.seed)
            backbone = Transformer(model_cfg)
        backbone.float().eval()
        pooled, labels = {}, {}
        for split in ("train", "dev", "test"):
            rows = feature_rows(feats[split])
            pooled[split] = features(backbone, rows, tokenizer.pad_token_id)
            labels[split] = np.array([int(r["target"][0]) for r in rows])
        results[name] = {pool: probe(pooled["train"][pool], labels["train"], pooled["dev"][pool], labels["dev"],
                                     pooled["test"][pool], labels["test"]) for pool in ("eos", "last_word", "mean")}
        shown = "  ".join(f"{p}: dev {r['dev']:.3f} test {r['test']:.3f}" for p, r in results[name].items())
        print(f"{name:<34} {shown}", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
