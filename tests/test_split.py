"""The edge–cloud split on Ray actors (issue 15 item 3), on CPU with tiny random models.

The module starts its own local Ray (2 CPUs, no dashboard, a small object store) and one
``SplitGenerator`` (an EdgeDrafter and a CloudVerifier actor), and stops both in the fixture's
``finally``. What it checks:

* greedy output through the two actors equals ``target.generate`` (and ``CrossSpecEngine.generate``)
  token for token, batch 1 and a left-padded batch 2, with an injected delay too;
* coupled sampling through the split equals the target sampling alone (``CoupledSampling``) with no
  probabilities crossing, and rejection sampling ships the draft probabilities;
* the bytes counted per direction and round equal the documented formula (``round_bytes``);
* prefill hiding across the actors: the edge drafts its free tokens while the cloud prefills;
* the injected round-trip time shows in the latency (each round waits for one RTT);
* bad input (a tree draft, a negative or non-number delay, a bad generate argument) gets a clear
  error naming the argument.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LogitsProcessorList

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[serve]')")

from crossspec_kernels import testing_models as tm  # noqa: E402
from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine, TreeDraft  # noqa: E402
from crossspec_kernels.runtime.sampling import CoupledSampling  # noqa: E402
from crossspec_kernels.serving.split import (  # noqa: E402
    DelayedLink,
    SplitGenerator,
    round_bytes,
    tensor_bytes,
)

NEW_TOKENS = 10
GAMMA = 3
BUDGET = 4


def noisy_target():
    """The target with noisy weights: it reads the same video and agrees with the target on about
    one draft in five (rounds accept 0..3 of 3 drafts)."""
    return tm.perturbed(tm.tiny_video_llava(seed=0), 0.15, seed=5)


@pytest.fixture(scope="module")
def models():
    return tm.tiny_video_llava(seed=0), noisy_target()


@pytest.fixture(scope="module")
def split(models):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024, log_to_driver=False)
    try:
        target, drafter = models
        generator = SplitGenerator(
            target, drafter, draft=ChainDraft(gamma=GAMMA), free_token_budget=BUDGET, backend="reference"
        )
        yield generator
    finally:
        ray.shutdown()


def expected(inputs: dict, **kwargs) -> torch.Tensor:
    reference = tm.tiny_video_llava(seed=0)
    with torch.no_grad():
        out = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :]


def test_greedy_equals_target_generate_batch2_left_padded(split):
    inputs = tm.video_batch()
    split.set_rtt(0.0)
    out = split.generate(inputs, dict(inputs), max_new_tokens=NEW_TOKENS, eos_token_id=[])
    want = expected(inputs, eos_token_id=None)
    assert torch.equal(out.sequences, want)
    assert out.stats["rounds"] < NEW_TOKENS  # some drafts were accepted
    # The engine on one device gives the same tokens.
    engine = CrossSpecEngine(
        tm.tiny_video_llava(seed=0),
        tm.perturbed(tm.tiny_video_llava(seed=0), 0.6, seed=5),
        backend="reference",
    )
    same = engine.generate(inputs, dict(inputs), max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert torch.equal(same.sequences, out.sequences)


@pytest.mark.parametrize("row", [0, 1])
def test_greedy_batch1_with_delay_and_eos(split, row):
    inputs = tm.single_row(tm.video_batch(), row)
    want = expected(inputs, eos_token_id=None)
    eos = int(want[0, 4])  # stops at its first occurrence, as generate does
    want_eos = expected(inputs, eos_token_id=eos, pad_token_id=0)
    split.set_rtt(30.0)
    try:
        out = split.generate(
            inputs, dict(inputs), max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0
        )
    finally:
        split.set_rtt(0.0)
    assert torch.equal(out.sequences, want_eos)
    # Every round waits for one round trip (drafts out, verdict back).
    assert out.stats["total_ms"] >= 30.0 * out.stats["rounds"] - 1.0
    assert out.stats["rtt_ms"] == 30.0


def test_the_drafter_drafts_while_the_target_prefills(split):
    """Prefill hiding across the actors: the cloud's acknowledgement of its prefill cannot reach the
    edge before one round trip, so with a long one the edge drafts its whole free-token budget for the
    first round (its own prefill never waits for the target's)."""
    inputs = tm.single_row(tm.video_batch(), 0)
    split.set_rtt(200.0)
    try:
        out = split.generate(inputs, dict(inputs), max_new_tokens=BUDGET + 1, eos_token_id=[])
    finally:
        split.set_rtt(0.0)
    assert out.stats["first_round_drafts"] == BUDGET
    assert out.stats["bytes"]["edge_to_cloud_per_round"][0] == 4 * BUDGET
    assert torch.equal(out.sequences, expected(inputs, eos_token_id=None)[:, : BUDGET + 1])


def test_bytes_per_round_match_the_formula(split):
    inputs = tm.video_batch()
    batch = inputs["input_ids"].shape[0]
    out = split.generate(inputs, dict(inputs), max_new_tokens=NEW_TOKENS, eos_token_id=[])
    counted = out.stats["bytes"]
    rounds = out.stats["rounds"]
    first = out.stats["first_round_drafts"]
    assert 1 <= first <= BUDGET
    assert len(counted["edge_to_cloud_per_round"]) == len(counted["cloud_to_edge_per_round"]) == rounds
    # Greedy: 4·B·N up (N = first_round_drafts, then gamma), 5·B down.
    drafts = [first] + [GAMMA] * (rounds - 1)
    assert counted["edge_to_cloud_per_round"] == [round_bytes(batch, n)[0] for n in drafts]
    assert counted["cloud_to_edge_per_round"] == [5 * batch] * rounds
    assert [round_bytes(batch, n)[0] for n in drafts] == [4 * batch * n for n in drafts]
    assert (
        out.stats["request_bytes"]
        == tensor_bytes(inputs)
        == sum(t.numel() * t.element_size() for t in inputs.values())
    )


def test_coupled_sampling_equals_target_alone_and_ships_no_probabilities(split):
    inputs = tm.single_row(tm.video_batch(), 0)
    width = inputs["input_ids"].shape[1]
    out = split.generate(
        inputs,
        dict(inputs),
        max_new_tokens=NEW_TOKENS,
        temperature=0.8,
        seed=7,
        sampling="coupled",
        eos_token_id=[],
    )
    processors = LogitsProcessorList([CoupledSampling(7, 0.8, width)])
    assert torch.equal(out.sequences, expected(inputs, eos_token_id=None, logits_processor=processors))
    drafts = [out.stats["first_round_drafts"]] + [GAMMA] * (out.stats["rounds"] - 1)
    assert out.stats["bytes"]["edge_to_cloud_per_round"] == [4 * n for n in drafts]


def test_rejection_sampling_ships_the_draft_probabilities(split):
    inputs = tm.single_row(tm.video_batch(), 1)
    out = split.generate(inputs, dict(inputs), max_new_tokens=6, temperature=1.0, seed=3, eos_token_id=[])
    assert out.sequences.shape == (1, 6)
    vocab = out.stats["bytes"]["shared_vocab"]
    drafts = [out.stats["first_round_drafts"]] + [GAMMA] * (out.stats["rounds"] - 1)
    assert out.stats["bytes"]["edge_to_cloud_per_round"] == [round_bytes(1, n, vocab)[0] for n in drafts]
    assert [round_bytes(1, n, vocab)[0] for n in drafts] == [4 * n + 4 * n * vocab for n in drafts]


def test_bad_arguments_name_themselves(models, split):
    target, drafter = models
    with pytest.raises(ValueError, match="draft must be a ChainDraft; tree drafts"):
        SplitGenerator(target, drafter, draft=TreeDraft(top_k=2, depth=2, max_nodes=4))
    for bad in (-1.0, float("nan"), "20"):
        with pytest.raises(ValueError, match="rtt_ms must"):
            SplitGenerator(target, drafter, rtt_ms=bad)
        with pytest.raises(ValueError, match="rtt_ms must"):
            split.set_rtt(bad)
    with pytest.raises(ValueError, match="rtt_ms must"):
        DelayedLink(-5)
    with pytest.raises(ValueError, match="free_token_budget must"):
        SplitGenerator(target, drafter, free_token_budget=0)
    inputs = tm.video_batch()
    with pytest.raises(ValueError, match="max_new_tokens must"):
        split.generate(inputs, dict(inputs), max_new_tokens=0)
    with pytest.raises(ValueError, match="sampling must"):
        split.generate(inputs, dict(inputs), max_new_tokens=2, sampling="greedy")
    with pytest.raises(ValueError, match="drafter_inputs has batch 1"):
        split.generate(inputs, tm.single_row(inputs, 0), max_new_tokens=2)


def test_a_failing_drafter_falls_back_without_touching_the_output(models):
    """A drafter whose hidden states are NaN: no drafts from then on, the cloud decodes alone."""
    target, _ = models
    broken = noisy_target()
    with torch.no_grad():
        broken.model.language_model.norm.weight.fill_(float("nan"))
    # The module's generator holds the 2 CPUs of this Ray: these actors ask for none.
    generator = SplitGenerator(
        target,
        broken,
        draft=ChainDraft(gamma=GAMMA),
        backend="reference",
        drafter_options={"num_cpus": 0},
        verifier_options={"num_cpus": 0},
    )
    try:
        inputs = tm.video_batch()
        out = generator.generate(inputs, dict(inputs), max_new_tokens=NEW_TOKENS, eos_token_id=[])
    finally:
        generator.close()
    assert torch.equal(out.sequences, expected(inputs, eos_token_id=None))
    assert out.stats["fallback"] is True and "not finite" in out.stats["fallback_reason"]
    assert out.stats["rounds"] == NEW_TOKENS and out.stats["acceptance_rate"] == 0.0
