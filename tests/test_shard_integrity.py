"""Shard integrity: a changed byte (same size) is caught by its sha256 under both
``data.on_corrupt_shard`` settings, wherever the loader starts and with DataLoader workers;
``launcher/shard.py --verify`` finds it; skipped samples reach metrics.jsonl, TensorBoard, the
trainer state (and survive a resume) and the final line of a real 2-rank run.

The damage is one flipped bit in the lowest byte of a token: the token stays a valid id and the
tar headers stay intact, so only the checksum can tell (the first test shows that).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from crucible.fileio import sha256_file
from data_pipeline.loader.config import LoaderConfig
from data_pipeline.loader.order import EpochOrder
from data_pipeline.loader.reading import ShardError
from data_pipeline.loader.train import build_train_loader
from tests.datasets import shared_token_dataset

BATCH = 8  # rows per global batch in the loader tests (= the 2-rank run: 2 x micro batch 4)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return shared_token_dataset(tmp_path_factory)


def _slot_samples(manifest: Path, slots: int) -> list[tuple[int, int]]:
    """(shard, sample in shard) of each of the first ``slots`` global training slots (epoch 0,
    default seed)."""
    cfg = LoaderConfig(manifests=[str(manifest)])
    loader = build_train_loader(cfg, 1, 0, 1)
    order = EpochOrder(loader.sources[0].index, cfg.seed, 0, 0, cfg.shuffle_buffer_shards)
    return [order.locate(g) for g in range(slots)]


class Flipped:
    """A copy of the data set with one bit flipped in the sample at slot ``3 * BATCH`` (the
    first row of global batch 3); its shard also gives rows to batches 0-2."""

    def __init__(self, manifest: Path, dest: Path) -> None:
        shutil.copytree(manifest.parent, dest)
        self.manifest = dest / "manifest.json"
        data = json.loads(self.manifest.read_text())
        slots = _slot_samples(manifest, 64 * BATCH)
        self.slot_shards = [shard for shard, _ in slots]
        self.shard, sample = slots[3 * BATCH]
        entry = data["splits"]["train"][self.shard]
        self.path = dest / entry["path"]
        self.expected_sha256 = entry["sha256"]
        raw = bytearray(self.path.read_bytes())
        offset = data["sample_layout"]["header_bytes"] + sample * data["sample_layout"]["stride"]
        self.clean_sample = bytes(raw[offset:offset + data["sample_layout"]["sample_bytes"]])
        raw[offset] ^= 1  # the sample's first token, lowest bit: still a valid id
        self.path.write_bytes(raw)
        self.damaged_sample = bytes(raw[offset:offset + data["sample_layout"]["sample_bytes"]])
        self.actual_sha256 = sha256_file(self.path)
        assert self.actual_sha256 != self.expected_sha256
        assert self.path.stat().st_size == entry["bytes"]

    def from_bad_shard(self, first_slot: int, n: int) -> list[bool]:
        return [s == self.shard for s in self.slot_shards[first_slot:first_slot + n]]


@pytest.fixture(scope="module")
def flipped(manifest, tmp_path_factory) -> Flipped:
    return Flipped(manifest, tmp_path_factory.mktemp("flipped") / "shards")


def _cfg(manifest: Path | str, **kw) -> LoaderConfig:
    return LoaderConfig(manifests=[str(manifest)], **kw)


def _take(loader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _rows(batches: list[torch.Tensor]) -> list[bytes]:
    return [row.numpy().astype("<u2").tobytes() for b in batches for row in b]


def test_flipped_byte_passes_every_check_but_the_checksum(flipped):
    """Without checksums the damaged sample is trained on: size, tar headers and token range
    are all fine."""
    loader = build_train_loader(_cfg(flipped.manifest, verify_checksums=False), BATCH, 0, 1)
    rows = _rows(_take(loader, 4))
    assert flipped.damaged_sample in rows and flipped.clean_sample not in rows
    assert loader.stats["skipped_samples"] == 0


def test_flipped_byte_is_a_clear_error_before_any_sample_of_the_shard(manifest, flipped):
    """Resumed in the middle of the damaged shard (batches 0-2 already took some of its rows):
    the next batch needs it, so the shard is hashed whole first and the batch raises."""
    assert any(flipped.from_bad_shard(0, 3 * BATCH)), "resume must land mid-shard"
    clean = build_train_loader(_cfg(manifest), BATCH, 0, 1)
    _take(clean, 3)
    resumed = build_train_loader(_cfg(flipped.manifest), BATCH, 0, 1)
    resumed.load_state_dict(clean.state_dict())  # same manifest bytes: the state fits
    with pytest.raises(ShardError) as err:
        _take(resumed, 1)
    message = str(err.value)
    assert "\n" not in message
    for part in (str(flipped.path), flipped.expected_sha256, flipped.actual_sha256,
                 "launcher/shard.py --verify", "on_corrupt_shard=skip"):
        assert part in message, part
    assert resumed.stats["skipped_samples"] == 0 and resumed.consumed_samples == 3 * BATCH


def test_flipped_byte_under_skip_replaces_and_counts_every_sample_of_the_shard(manifest, flipped):
    n = 30
    reference = _take(build_train_loader(_cfg(manifest), BATCH, 0, 1), n)
    loader = build_train_loader(_cfg(flipped.manifest, on_corrupt_shard="skip"), BATCH, 0, 1)
    got = _take(loader, n)
    bad = flipped.from_bad_shard(0, n * BATCH)
    assert sum(bad) > 0
    for b, (ref, batch) in enumerate(zip(reference, got, strict=True)):
        for i in range(BATCH):
            if bad[b * BATCH + i]:  # replaced by the batch's first row from a good shard
                first_good = next(j for j in range(BATCH) if not bad[b * BATCH + j])
                assert torch.equal(batch[i], ref[first_good])
            else:
                assert torch.equal(batch[i], ref[i])
    assert loader.stats["skipped_samples"] == loader.skipped_samples == sum(bad)
    assert loader.stats["corrupt_shards"] == [str(flipped.path)]
    assert flipped.damaged_sample not in _rows(got)


def test_workers_send_their_counts_and_errors(flipped):
    n = 12
    inline = build_train_loader(_cfg(flipped.manifest, on_corrupt_shard="skip"), BATCH, 0, 1)
    expected = _take(inline, n)
    workers = build_train_loader(_cfg(flipped.manifest, on_corrupt_shard="skip", num_workers=2),
                                 BATCH, 0, 1)
    got = _take(workers, n)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert workers.skipped_samples == inline.skipped_samples == sum(flipped.from_bad_shard(0, n * BATCH))
    assert workers.stats["corrupt_shards"] == [str(flipped.path)]
    workers.close()
    failing = build_train_loader(_cfg(flipped.manifest, num_workers=2), BATCH, 0, 1)
    with pytest.raises(ShardError) as err:
        _take(failing, n)
    assert "Traceback" not in str(err.value) and flipped.actual_sha256 in str(err.value)
    first_bad = next(b for b in range(n) if any(flipped.from_bad_shard(b * BATCH, BATCH)))
    assert failing.consumed_samples == first_bad * BATCH  # no batch with a row of the bad shard


def test_url_and_pipe_shards_are_verified(flipped, tmp_path):
    for how, prefix in (("fsspec", "file://"), ("pipe", "pipe:cat ")):
        data = json.loads(flipped.manifest.read_text())
        for entries in data["splits"].values():
            for e in entries:
                e["path"] = prefix + str(flipped.manifest.parent / e["path"])
        path = tmp_path / how / "manifest.json"
        path.parent.mkdir()
        path.write_text(json.dumps(data))
        with pytest.raises(ShardError, match=flipped.actual_sha256):
            _take(build_train_loader(_cfg(path), BATCH, 0, 1), 8)


def test_verify_command_reports_each_bad_shard_and_exits_1(manifest, flipped, tmp_path, capsys):
    from launcher.shard import main

    assert main(["--verify", str(manifest), str(manifest.parent)]) == 0
    out = capsys.readouterr().out
    assert "BAD" not in out and "every shard matches" in out
    n_shards = sum(len(v) for v in json.loads(manifest.read_text())["splits"].values())
    assert f"checked {2 * n_shards} shards" in out

    broken = tmp_path / "broken"
    shutil.copytree(flipped.manifest.parent, broken)
    data = json.loads(flipped.manifest.read_text())
    truncated = broken / data["splits"]["train"][0]["path"]
    truncated.write_bytes(truncated.read_bytes()[:1000])
    missing = broken / data["splits"]["validation"][0]["path"]
    missing.unlink()
    assert main(["--verify", str(broken / "manifest.json"), "--threads", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    bad = {line.split()[1]: line for line in lines if line.startswith("BAD ")}
    changed = str(broken / flipped.path.relative_to(flipped.manifest.parent))
    assert set(bad) == {changed, str(truncated), str(missing)}
    assert flipped.expected_sha256 in bad[changed] and flipped.actual_sha256 in bad[changed]
    assert "1000 bytes" in bad[str(truncated)] and "missing" in bad[str(missing)]
    assert "3 bad shards" in lines[-1]
    # output= of the recipe is the default set; a missing manifest is a user error (exit 2)
    assert main([f"output={manifest.parent}", "--verify"]) == 0
    assert main(["--verify", str(tmp_path / "nowhere")]) == 2
    assert main(["--verify", f"output={manifest.parent}"]) == 2  # an override after --verify
    assert "before --verify" in capsys.readouterr().err


# ------------------------------------------------------------------ a real run (2 CPU ranks)

def _metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_skipped_samples_reach_metrics_state_tensorboard_and_resume(flipped, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.harness import ROOT, run_deepspeed

    bad = flipped.from_bad_shard(0, 6 * BATCH)
    # every rank's micro batch (4 rows) keeps a good row to replace the bad ones with
    assert all(not all(bad[i:i + 4]) for i in range(0, len(bad), 4))
    expected = [sum(bad[:s * BATCH]) for s in range(7)]  # cumulative, summed over both ranks
    assert expected[1] > 0
    run = tmp_path / "run"

    def launch(steps: int):
        return run_deepspeed(
            ROOT / "launcher" / "pretrain.py",
            ["--config", "configs/pretrain/cpu_tiny.yaml", f"run_dir={run}",
             f"data.manifests=[{flipped.manifest}]", "data.on_corrupt_shard=skip",
             f"train.max_steps={steps}", "train.micro_batch_size=4", "train.eval_every=0",
             "train.eval_batches=1", "checkpoint.every=4", "checkpoint.write_model_dir=false",
             "log.every=2"],
            num_gpus=2, timeout=300, log_dir=tmp_path / f"logs-{steps}").check()

    first = launch(4)
    output = first.stdout + (run / "logs" / "rank0.log").read_text()
    got = _metrics(run)
    assert [got[s]["data/skipped_samples"] for s in range(1, 5)] == expected[1:5]
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["skipped_samples"] == expected[4]
    assert f"{expected[4]} samples replaced from corrupt shards" in output  # the final line
    assert f"{expected[4]} of 32 training samples" in output  # and the closing warning

    launch(6)  # resumes at step 4: the count continues from the checkpoint
    got = _metrics(run)
    assert [got[s]["data/skipped_samples"] for s in (5, 6)] == expected[5:7]
    state = json.loads((run / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["skipped_samples"] == expected[6]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("data/skipped_samples")}
    assert logged[2] == expected[2] and logged[6] == expected[6]
