"""End-to-end tests of the adapter toolchain (extract -> train -> eval) on tiny random HF models, CPU.

Why the task is learnable: the target (hidden 64) and the drafter (a different random Llama, hidden
48) share token ids, and in tiny randomly initialised Llamas (init std 0.02) the residual stream is
dominated by the current token's embedding, so both final-norm hidden states are close to a code of
the current token plus some context. The target's greedy next token is largely (not fully) a function
of that, and an adapter can learn the drafter-code -> target-hidden map from training records and
apply it to held-out records. An untrained adapter agrees ~1/V of the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from crossspec_kernels.adapter_tools import (
    ManifestError,
    PairDataError,
    TrainConfig,
    evaluate_adapter,
    extract_pairs,
    load_lm_head,
    load_pairs,
    read_manifest,
    split_records,
    train_adapter,
    write_manifest,
)
from crossspec_kernels.adapter_tools.evaluate import run_lengths
from crossspec_kernels.testing_models import VOCAB_SIZE, tiny_llama

NUM_RECORDS = 40
NEW_TOKENS = 12
RECORDS_PER_SHARD = 8
EVAL_FRACTION = 0.25
D_TARGET, D_DRAFT = 64, 48


def make_target():
    return tiny_llama(seed=0)  # hidden 64


def make_drafter(**overrides):
    return tiny_llama(seed=1, head_dim=12, **overrides)  # hidden 48, same vocabulary


def synthetic_entries(count: int, seed: int = 0):
    """(drafter_inputs, target_inputs, prompt) with the same random prompt ids for both models."""
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for number in range(count):
        length = int(torch.randint(6, 14, (1,), generator=gen))
        ids = torch.randint(3, VOCAB_SIZE - 2, (length,), generator=gen)
        mask = torch.ones(length, dtype=torch.int64)
        entries.append(
            (
                {"input_ids": ids},
                {"input_ids": ids.view(1, -1), "attention_mask": mask.view(1, -1)},
                f"p{number}",
            )
        )
    return entries


@pytest.fixture(scope="module")
def models():
    return make_drafter(), make_target()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("manifest") / "pairs.jsonl", synthetic_entries(NUM_RECORDS))


@pytest.fixture(scope="module")
def pairs_dir(models, manifest, tmp_path_factory):
    drafter, target = models
    out = tmp_path_factory.mktemp("pairs")
    extract_pairs(
        drafter,
        target,
        manifest,
        out,
        num_new_tokens=NEW_TOKENS,
        records_per_shard=RECORDS_PER_SHARD,
        store_target_hidden=True,
        show_progress=False,
    )
    return out


def adapter_api():
    adapters = pytest.importorskip("crossspec_kernels.models.adapters")
    return adapters.AdapterConfig, adapters.build_adapter, adapters.load_adapter


# ---------------------------------------------------------------------------------------------- extract


def test_extract_layout_matches_models(models, manifest, pairs_dir):
    drafter, target = models
    index = json.loads((pairs_dir / "index.json").read_text())
    assert index["complete"] and index["num_shards"] == NUM_RECORDS // RECORDS_PER_SHARD
    pairs = load_pairs(pairs_dir)
    assert pairs.drafter_hidden.shape[1] == D_DRAFT and pairs.target_hidden.shape[1] == D_TARGET
    assert len(pairs) == sum(s["num_pairs"] for s in index["shards"])
    assert load_lm_head(pairs_dir).shape == (VOCAB_SIZE, D_TARGET)

    # Record 3 by hand: greedy continuation, drafter hidden at the matching positions.
    record = read_manifest(manifest)[3]
    t_inputs = torch.load(record.target_inputs)
    prompt = t_inputs["input_ids"]
    with torch.no_grad():
        greedy = target.generate(**t_inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        new = greedy[0, prompt.shape[1] :]
        rows = pairs.record_ids == 3
        assert torch.equal(pairs.target_tokens[rows], new)
        assert torch.equal(pairs.positions[rows], torch.arange(len(new)))
        full = torch.cat([prompt[0], new[:-1]]).view(1, -1)
        d_hidden = drafter(input_ids=full, output_hidden_states=True).hidden_states[-1][0, -len(new) :]
        torch.testing.assert_close(pairs.drafter_hidden[rows], d_hidden)
        assert torch.equal(pairs.prev_tokens[rows], full[0, -len(new) :])
        # The stored target hidden states, through the LM head, give back the greedy tokens.
        logits = pairs.target_hidden[rows] @ load_lm_head(pairs_dir).T
        assert torch.equal(logits.argmax(-1), new)
        torch.testing.assert_close(pairs.target_prev_hidden[rows][1:], pairs.target_hidden[rows][:-1])


def test_extract_resumes_after_interruption(models, manifest, pairs_dir, tmp_path):
    drafter, target = models
    kwargs = dict(
        num_new_tokens=NEW_TOKENS,
        records_per_shard=RECORDS_PER_SHARD,
        store_target_hidden=True,
        show_progress=False,
    )
    out = tmp_path / "pairs"
    partial = extract_pairs(drafter, target, manifest, out, max_shards=2, **kwargs)  # "interrupted" after 2
    assert not partial["complete"] and len(partial["shards"]) == 2
    with pytest.raises(PairDataError, match="incomplete"):
        load_pairs(out)
    (out / "shard-00002.safetensors.tmp").write_bytes(b"half-written")  # what a kill mid-write leaves
    before = (out / "shard-00000.safetensors").stat().st_mtime_ns
    done = extract_pairs(drafter, target, manifest, out, **kwargs)
    assert done["complete"] and len(done["shards"]) == NUM_RECORDS // RECORDS_PER_SHARD
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == before  # finished shards skipped
    resumed, whole = load_pairs(out), load_pairs(pairs_dir)
    for name in (
        "drafter_hidden",
        "target_tokens",
        "prev_tokens",
        "record_ids",
        "positions",
        "target_hidden",
    ):
        torch.testing.assert_close(getattr(resumed, name), getattr(whole, name), rtol=0, atol=0)
    # Other settings in the same folder: a named error, not a silent mix.
    with pytest.raises(PairDataError, match="other inputs/settings"):
        extract_pairs(
            drafter,
            target,
            manifest,
            out,
            num_new_tokens=5,
            records_per_shard=RECORDS_PER_SHARD,
            show_progress=False,
        )


# ---------------------------------------------------------------------------------------------- train/eval


def test_training_raises_held_out_agreement(pairs_dir, tmp_path):
    AdapterConfig, build_adapter, load_adapter = adapter_api()
    adapter = {"kind": "bottleneck", "rank": 64}
    config = TrainConfig(
        adapter=adapter, epochs=30, batch_size=16, lr=3e-3, eval_fraction=EVAL_FRACTION, seed=0
    )
    result = train_adapter(pairs_dir, tmp_path / "run", config, show_progress=False)
    assert result["finished"] and len(result["history"]) == config.epochs

    pairs, lm_head = load_pairs(pairs_dir), load_lm_head(pairs_dir)
    train_pairs, held_out = split_records(pairs, EVAL_FRACTION, seed=0)
    assert not set(train_pairs.record_ids.tolist()) & set(held_out.record_ids.tolist())
    torch.manual_seed(0)
    untrained = evaluate_adapter(
        build_adapter(AdapterConfig(d_draft=D_DRAFT, d_target=D_TARGET, **adapter)), held_out, lm_head
    )
    trained = evaluate_adapter(load_adapter(str(tmp_path / "run" / "best")), held_out, lm_head)
    print(f"held-out top1: untrained {untrained['top1']:.3f} -> trained {trained['top1']:.3f}")
    assert untrained["top1"] < 0.08
    # Measured here: 0.018 -> 0.239 (a lookup of the next token from the current token on the
    # training records scores ~0.28 on these held-out records, a rough ceiling for this data).
    assert trained["top1"] >= untrained["top1"] + 0.15, (untrained["top1"], trained["top1"])
    assert trained["top5"] >= trained["top1"]
    # The best checkpoint is the best epoch by held-out top-1, and its metrics are the ones reported.
    best = max(result["history"], key=lambda r: (r["eval_top1"], -r["eval_loss"]))
    assert result["best"] == best
    assert trained["top1"] == pytest.approx(best["eval_top1"])

    lengths = trained["expected_accepted_length"]
    a = trained["top1"]
    assert lengths["iid"]["1"] == pytest.approx(a) and lengths["iid"]["3"] == pytest.approx(a + a**2 + a**3)
    measured = [lengths["measured"][str(g)] for g in range(1, 9)]
    assert all(0 <= m <= g for g, m in zip(range(1, 9), measured))
    assert measured[0] == pytest.approx(a)  # gamma 1: every position is a window


def test_training_resume_matches_uninterrupted_run(pairs_dir, tmp_path):
    _, _, load_adapter = adapter_api()
    config = TrainConfig(adapter={"kind": "bottleneck", "rank": 32}, epochs=4, batch_size=64, lr=3e-3, seed=7)
    whole = train_adapter(pairs_dir, tmp_path / "whole", config, show_progress=False)
    first = train_adapter(pairs_dir, tmp_path / "cut", config, stop_after_epochs=2, show_progress=False)
    assert not first["finished"] and len(first["history"]) == 2
    second = train_adapter(pairs_dir, tmp_path / "cut", config, show_progress=False)
    assert second["finished"] and second["history"] == whole["history"]
    for folder in ("last", "best"):
        a = load_adapter(str(tmp_path / "whole" / folder)).state_dict()
        b = load_adapter(str(tmp_path / "cut" / folder)).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The same seed from scratch gives the same run (determinism).
    again = train_adapter(pairs_dir, tmp_path / "again", config, show_progress=False)
    assert again["history"] == whole["history"]


class _CreatesFile:
    """A pickle payload: unpickling it calls open(path, "w"), so the file's existence tells whether it ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_training_refuses_a_planted_checkpoint(pairs_dir, tmp_path):
    adapter_api()
    out, marker = tmp_path / "run", tmp_path / "payload_ran"
    out.mkdir()
    torch.save({"config": _CreatesFile(marker)}, out / "checkpoint.pt")
    config = TrainConfig(adapter={"kind": "linear"}, epochs=1, batch_size=64)
    with pytest.raises(ValueError, match=r"cannot resume from .*run/checkpoint.pt: .*--no-resume"):
        train_adapter(pairs_dir, out, config, show_progress=False)
    assert not marker.exists()
    torch.load(out / "checkpoint.pt", weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()


def test_smooth_l1_to_target_hidden(pairs_dir, tmp_path):
    adapter_api()
    config = TrainConfig(adapter={"kind": "linear"}, epochs=1, batch_size=64, smooth_l1_weight=0.5)
    result = train_adapter(pairs_dir, tmp_path / "sl1", config, show_progress=False)
    assert result["finished"] and torch.isfinite(torch.tensor(result["history"][0]["train_loss"]))


def test_eagle_adapter_trains_with_target_hidden(pairs_dir, tmp_path):
    _, _, load_adapter = adapter_api()
    adapter = {"kind": "eagle", "use_target_hidden": True, "num_heads": 4}
    config = TrainConfig(adapter=adapter, epochs=2, batch_size=64, lr=3e-3, smooth_l1_weight=0.1)
    result = train_adapter(pairs_dir, tmp_path / "eagle", config, show_progress=False)
    assert result["finished"]
    loaded = load_adapter(str(tmp_path / "eagle" / "best"))
    assert loaded.config.kind == "eagle" and loaded.config.vocab_size == VOCAB_SIZE
    with pytest.raises(ValueError, match="vocab_size=16"):
        train_adapter(
            pairs_dir,
            tmp_path / "e2",
            TrainConfig(adapter={**adapter, "vocab_size": 16}),
            show_progress=False,
        )


def test_run_lengths_exact():
    agree = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    records = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    # gamma 1: mean agreement; gamma 2: windows (0,1),(1,2),(2,3) | (0,1),(1,2),(2,3) of each record.
    assert run_lengths(agree, records, positions, 1) == (6 / 8, 8)
    assert run_lengths(agree, records, positions, 2) == ((2 + 1 + 0 + 2 + 1 + 0) / 6, 6)
    assert run_lengths(agree, records, positions, 5) == (None, 0)  # no record is 5 long


# ---------------------------------------------------------------------------------------------- bad inputs


def test_bad_manifests(models, tmp_path):
    drafter, target = models
    with pytest.raises(ManifestError, match="does not exist"):
        extract_pairs(drafter, target, tmp_path / "nope.jsonl", tmp_path / "out", show_progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(ManifestError, match="no records"):
        read_manifest(empty)
    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text(json.dumps({"drafter_inputs": "a.pt"}) + "\n")
    with pytest.raises(ManifestError, match="target_inputs"):
        read_manifest(lacking)
    missing_file = tmp_path / "missing.jsonl"
    missing_file.write_text(json.dumps({"drafter_inputs": "a.pt", "target_inputs": "b.pt"}) + "\n")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(missing_file)
    batched = write_manifest(
        tmp_path / "batched.jsonl", [({"input_ids": torch.ones(2, 5, dtype=torch.int64)},) * 2 + ("x",)]
    )
    with pytest.raises(ManifestError, match="one request"):
        extract_pairs(drafter, target, batched, tmp_path / "out2", show_progress=False)


def test_mismatched_vocab_and_hidden_sizes(models, manifest, pairs_dir, tmp_path):
    _, target = models
    small_vocab = make_drafter(vocab_size=VOCAB_SIZE // 2, pad_token_id=0)
    with pytest.raises(ValueError, match="vocabulary"):
        extract_pairs(small_vocab, target, manifest, tmp_path / "out", show_progress=False)
    adapter_api()
    with pytest.raises(ValueError, match="d_draft=32"):
        train_adapter(
            pairs_dir,
            tmp_path / "t1",
            TrainConfig(adapter={"kind": "linear", "d_draft": 32}),
            show_progress=False,
        )
    with pytest.raises(ValueError, match="d_target=80"):
        train_adapter(
            pairs_dir,
            tmp_path / "t2",
            TrainConfig(adapter={"kind": "linear", "d_target": 80}),
            show_progress=False,
        )
    with pytest.raises(ValueError, match="lm_head must be"):
        train_adapter(
            pairs_dir,
            tmp_path / "t3",
            TrainConfig(adapter={"kind": "linear"}),
            lm_head=torch.zeros(VOCAB_SIZE, 80),
            show_progress=False,
        )


def test_empty_and_missing_pair_folders(pairs_dir, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(PairDataError, match="no index.json"):
        load_pairs(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((pairs_dir / "index.json").read_text())
    index["shards"], index["num_shards"] = index["shards"][:1], 1
    (broken / "index.json").write_text(json.dumps(index))
    empty = {"drafter_hidden": torch.zeros(0, D_DRAFT)}
    empty |= {
        k: torch.zeros(0, dtype=torch.int64)
        for k in ("target_tokens", "prev_tokens", "record_ids", "positions")
    }
    save_file(empty, str(broken / index["shards"][0]["file"]))
    with pytest.raises(PairDataError, match="empty shard"):
        load_pairs(broken)
    index["shards"] = []
    (broken / "index.json").write_text(json.dumps(index))
    with pytest.raises(PairDataError, match="lists no shards"):
        load_pairs(broken)


# ---------------------------------------------------------------------------------------------- CLI


def _crossspec(*args, check=True):
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "crossspec_kernels.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"crossspec {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def test_cli_help():
    for command in ("extract", "train", "eval"):
        out = _crossspec("adapter", command, "--help").stdout
        assert f"crossspec adapter {command}" in out and "--pairs" in out or "--manifest" in out


def test_cli_end_to_end(tmp_path):
    adapter_api()
    make_drafter().save_pretrained(tmp_path / "drafter")
    make_target().save_pretrained(tmp_path / "target")
    manifest = write_manifest(tmp_path / "m.jsonl", synthetic_entries(12, seed=3))
    pairs, run = tmp_path / "pairs", tmp_path / "run"
    common = [
        "--drafter",
        str(tmp_path / "drafter"),
        "--target",
        str(tmp_path / "target"),
        "--manifest",
        str(manifest),
    ]
    first = _crossspec(
        "adapter",
        "extract",
        *common,
        "--out",
        str(pairs),
        "--num-new-tokens",
        "6",
        "--records-per-shard",
        "5",
        "--max-shards",
        "1",
        "--no-progress",
    )
    assert "1/3 shards" in first.stdout and "incomplete" in first.stdout
    second = _crossspec(
        "adapter",
        "extract",
        *common,
        "--out",
        str(pairs),
        "--num-new-tokens",
        "6",
        "--records-per-shard",
        "5",
        "--no-progress",
    )
    assert "3/3 shards" in second.stdout and "complete" in second.stdout
    _crossspec(
        "adapter",
        "train",
        "--pairs",
        str(pairs),
        "--out",
        str(run),
        "--kind",
        "linear",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--eval-fraction",
        "0.25",
        "--no-progress",
    )
    assert (run / "best").is_dir() and (run / "checkpoint.pt").is_file()
    out = _crossspec(
        "adapter",
        "eval",
        "--pairs",
        str(pairs),
        "--adapter",
        str(run / "best"),
        "--untrained",
        "--json",
        str(tmp_path / "eval.json"),
    )
    assert "top1" in out.stdout and "untrained" in out.stdout
    payload = json.loads((tmp_path / "eval.json").read_text())
    assert set(payload["results"]) == {"untrained", "adapter"}
    assert set(payload["results"]["adapter"]["expected_accepted_length"]["iid"]) == {
        str(g) for g in range(1, 9)
    }

    missing = _crossspec(
        "adapter",
        "extract",
        *common[:4],
        "--manifest",
        str(tmp_path / "nope.jsonl"),
        "--out",
        str(tmp_path / "x"),
        check=False,
    )
    assert missing.returncode == 2 and "ManifestError" in missing.stderr
    no_pairs = _crossspec(
        "adapter", "train", "--pairs", str(tmp_path / "x"), "--out", str(tmp_path / "y"), check=False
    )
    assert (
        no_pairs.returncode == 2
        and "--pairs folder" in no_pairs.stderr
        and "does not exist" in no_pairs.stderr
    )
