"""The drafter on its own device: ``runtime.devices.DevicePair`` and the engine through it.

On CPU the transfer path runs through ``DevicePair("cpu", "cpu", copy=True)``, which clones every
tensor that crosses into a separate buffer: the output must stay lossless, and the target's side
must never hold a tensor of the drafter's (nor the other way) except through the pair. The CUDA
tests (a target on cuda:0 beside a CPU drafter, or beside cuda:1) run on a GPU machine.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import LogitsProcessorList

from crossspec_kernels import testing_models as tm
from crossspec_kernels.models.adapters import AdapterConfig, LinearAdapter
from crossspec_kernels.models.feature_head import FeatureHead, feature_head_config
from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine, TreeDraft
from crossspec_kernels.runtime.devices import DevicePair, check_device
from crossspec_kernels.runtime.drafting import DraftModel, Proposal
from crossspec_kernels.runtime.round import Verifier
from crossspec_kernels.runtime.sampling import CoupledSampling

NEW_TOKENS = 10
TEMPERATURE = 0.05  # as test_coupled_sampling: sharpen the tiny models' flat logits
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def copying() -> DevicePair:
    return DevicePair(CPU, CPU, copy=True)


def expected(reference_model, inputs: dict) -> torch.Tensor:
    out = reference_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def adapter_drafter(batch: int, device=CPU):
    """A small unrelated LM (hidden 32) behind a linear adapter, with its own left-padded prompt."""
    drafter = tm.tiny_llama(seed=7, head_dim=8).to(device)
    prompts = [
        torch.randint(3, 100, (5 + 3 * row,), generator=torch.Generator().manual_seed(row))
        for row in range(batch)
    ]
    ids, mask = tm.left_pad(prompts)
    torch.manual_seed(11)
    adapter = LinearAdapter(AdapterConfig(kind="linear", d_draft=32, d_target=64)).eval().to(device)
    return drafter, dict(input_ids=ids.to(device), attention_mask=mask.to(device)), adapter


def storages(value) -> list[int]:
    """The storage addresses of every tensor in ``value`` (nested tuples, lists, dicts)."""
    out = []
    if isinstance(value, torch.Tensor):
        out.append(value.untyped_storage().data_ptr())
    elif isinstance(value, (tuple, list)):
        for item in value:
            out += storages(item)
    elif isinstance(value, dict):
        for item in value.values():
            out += storages(item)
    return out


# ----------------------------------------------------------------------------------------------
# DevicePair on its own
# ----------------------------------------------------------------------------------------------


def test_one_device_is_the_identity():
    pair = DevicePair(CPU).bind()
    proposal = Proposal.empty(2, CPU)
    assert pair.to_target(proposal) is proposal
    tensor = torch.arange(3)
    assert pair.to_drafter(tensor) is tensor
    assert pair.drafter_copy(tensor).data_ptr() == tensor.data_ptr()
    assert (pair.transfers, pair.tensors, pair.moved_bytes) == (0, 0, 0)
    assert not pair.crosses


def test_copying_pair_clones_nested_named_tuples_and_counts_bytes():
    pair = copying().bind()
    tokens = torch.arange(6).reshape(2, 3)
    mask = torch.ones(3, 3, dtype=torch.bool).tril().expand(2, -1, -1)  # a stride-0 view
    proposal = Proposal(tokens, None, tokens + 1, mask, None, 2, ["mark"])
    value = (proposal, {"flag": torch.tensor(True)}, [None, 4])
    moved = pair.to_target(value)
    assert isinstance(moved[0], Proposal) and moved[0].parents is None and moved[0].draft_probs is None
    assert moved[0].fed == 2 and moved[0].timestamps == ["mark"] and moved[2] == [None, 4]
    for before, after in zip(
        (tokens, tokens + 1, mask, value[1]["flag"]),
        (moved[0].tokens, moved[0].depth, moved[0].tree_mask, moved[1]["flag"]),
    ):
        assert torch.equal(before, after) and before.dtype == after.dtype
    assert not set(storages(value)) & set(storages(moved))
    assert (pair.transfers, pair.tensors) == (1, 4)
    assert pair.moved_bytes == 2 * 6 * 8 + 2 * 9 + 1
    assert pair.to_drafter((None, 3)) == (None, 3) and pair.transfers == 1  # nothing to move
    assert copying().bind().moved_bytes == 0  # counters belong to a bound pair
    assert pair.drafter_copy(tokens).data_ptr() != tokens.data_ptr()


def test_device_checker_errors():
    assert check_device("cpu", "drafter") == CPU
    with pytest.raises(
        ValueError, match="drafter is on meta; a drafter on its own device must be on 'cpu' or 'cuda"
    ):
        check_device(torch.device("meta"), "drafter")
    with pytest.raises(ValueError, match="drafter must be a torch.device"):
        check_device(3, "drafter")
    if not torch.cuda.is_available():
        for device in (torch.device("cuda", 3), torch.device("cuda", 0), "cuda"):
            with pytest.raises(ValueError, match=r"drafter is on cuda.*CUDA is not available"):
                check_device(device, "drafter")
    else:
        count = torch.cuda.device_count()
        with pytest.raises(
            ValueError, match=rf"drafter is on cuda:{count}, but this machine has {count} CUDA"
        ):
            check_device(torch.device("cuda", count), "drafter")
        assert check_device("cuda", "drafter") == torch.device("cuda", torch.cuda.current_device())
    with pytest.raises(ValueError, match="copy must be a bool"):
        DevicePair(CPU, CPU, copy=1)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"DevicePair: drafter_device is on cuda:{count + 2}, but"):
        DevicePair(CPU, f"cuda:{count + 2}")
    with pytest.raises(ValueError, match="DevicePair: target_device is on meta"):
        DevicePair("meta", CPU)
    assert DevicePair("meta").target == torch.device("meta")  # one device: not ours to judge


# ----------------------------------------------------------------------------------------------
# The engine through a copying pair: lossless, and nothing crosses except through the pair
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("draft", [ChainDraft(4), TreeDraft(top_k=2, depth=3, max_nodes=6)], ids=str)
def test_greedy_through_the_copying_pair_equals_generate_batch2(reference_model, target, batch_inputs, draft):
    want = expected(reference_model, batch_inputs)
    drafter, drafter_inputs, adapter = adapter_drafter(2)
    engine = CrossSpecEngine(
        target, drafter, adapter, draft=draft, backend="reference", device_pair=copying()
    )
    out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, want), (out.sequences, want)
    stats = out.stats
    assert not stats["fallback"], stats["fallback_reason"]
    assert (stats["device"], stats["drafter_device"]) == ("cpu", "cpu")
    # Every round: the proposal (and the finite flag) there; the verdict back, but after the last.
    assert stats["transfers"] == 2 * stats["rounds"] - 1
    assert stats["transfer_bytes"] > 0
    assert stats["transfer_bytes_per_round"] == stats["transfer_bytes"] / stats["rounds"]
    assert engine.drafter_lm_head_weight.data_ptr() != target.get_output_embeddings().weight.data_ptr()


@pytest.mark.parametrize("row", [0, 1])
def test_greedy_chain_through_the_copying_pair_batch1(reference_model, target, batch_inputs, row):
    inputs = tm.single_row(batch_inputs, row)
    drafter = tm.tiny_video_llava(seed=0)  # the target itself: every draft is accepted
    engine = CrossSpecEngine(target, drafter, draft=ChainDraft(3), backend="reference", device_pair=copying())
    out = engine.generate(inputs, dict(inputs), max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, expected(reference_model, inputs))
    # The counts came back right: every round committed gamma + 1 tokens from the drafter's cache.
    assert out.stats["acceptance_rate"] == 1.0 and out.stats["rounds"] < NEW_TOKENS


def test_neither_side_reads_the_others_tensors(target, batch_inputs, monkeypatch):
    """The verifier sees only copies of what the drafter proposed, and the drafter only copies of
    what the verifier decided (tensors kept alive, so addresses cannot be reused)."""
    drafted, verified, decided, read = [], [], [], []

    def spy(cls, name, before, after):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            before(args)
            result = original(self, *args, **kwargs)
            after(result)
            return result

        monkeypatch.setattr(cls, name, wrapper)

    spy(DraftModel, "chain", lambda args: None, drafted.append)
    spy(DraftModel, "tree", lambda args: None, drafted.append)
    spy(Verifier, "step", lambda args: verified.append(args), decided.append)
    spy(DraftModel, "pending", lambda args: read.append(args), lambda result: None)
    for draft in (ChainDraft(3), TreeDraft(2, 3, 5)):
        drafted.clear(), verified.clear(), decided.clear(), read.clear()
        drafter = tm.perturbed(tm.tiny_video_llava(seed=0), 0.6, seed=5)
        engine = CrossSpecEngine(target, drafter, draft=draft, backend="reference", device_pair=copying())
        engine.generate(batch_inputs, dict(batch_inputs), max_new_tokens=NEW_TOKENS)
        assert drafted and verified and decided and read
        drafter_side = set(storages(drafted)) | set(storages(read))
        target_side = set(storages(verified)) | set(storages(decided))
        assert not drafter_side & target_side, draft
        # ... and the same run on the identity pair shares them (so the check can fail).
        drafted.clear(), verified.clear()
        CrossSpecEngine(target, drafter, draft=draft, backend="reference").generate(
            batch_inputs, dict(batch_inputs), max_new_tokens=NEW_TOKENS
        )
        assert set(storages(drafted)) & set(storages(verified))


@pytest.mark.parametrize("draft", [ChainDraft(4), TreeDraft(2, 3, 6)], ids=str)
def test_coupled_sampling_through_the_copying_pair_equals_the_target_alone(
    reference_model, target, batch_inputs, draft
):
    drafter = tm.perturbed(tm.tiny_video_llava(seed=0), 0.3, seed=5)
    engine = CrossSpecEngine(target, drafter, draft=draft, backend="reference", device_pair=copying())
    seed = [3, 2**64 - 1]
    out = engine.generate(
        batch_inputs,
        dict(batch_inputs),
        max_new_tokens=NEW_TOKENS,
        temperature=TEMPERATURE,
        seed=seed,
        sampling="coupled",
        eos_token_id=[],
    )
    alone = tm.coupled_target_alone(reference_model, batch_inputs, seed, TEMPERATURE, NEW_TOKENS)
    assert torch.equal(out.sequences, alone)
    assert out.stats["acceptance_rate"] > 0 and out.stats["transfers"] > 0


def test_rejection_sampling_through_the_copying_pair_draws_the_same_tokens(target, batch_inputs):
    """The draft probabilities cross too: sequential prefill (fixed timing), same seed, same tokens."""
    drafter = tm.perturbed(tm.tiny_video_llava(seed=0), 0.3, seed=5)
    outputs = []
    for pair in (None, copying()):
        engine = CrossSpecEngine(
            target, drafter, draft=ChainDraft(3), backend="reference", overlap=False, device_pair=pair
        )
        outputs.append(
            engine.generate(
                batch_inputs,
                dict(batch_inputs),
                max_new_tokens=NEW_TOKENS,
                temperature=0.7,
                seed=5,
                eos_token_id=[],
            )
        )
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert outputs[1].stats["transfer_bytes"] > outputs[0].stats["transfer_bytes"] == 0
    # A sampled chain's draft_probs [B, N+1, V] float32 crossed every round.
    assert (
        outputs[1].stats["transfer_bytes_per_round"]
        > 2 * 4 * 4 * target.get_output_embeddings().weight.shape[0]
    )


def test_b1_head_stays_with_the_target(reference_model, target, batch_inputs):
    """A B1 head drafts on the target's side: only the free tokens (and their positions) cross."""
    torch.manual_seed(0)
    head = FeatureHead(feature_head_config(target.config, "b1")).eval()
    head.load_embedding(target.get_input_embeddings().weight)
    drafter, drafter_inputs, adapter = adapter_drafter(2)
    engine = CrossSpecEngine(
        target,
        drafter,
        adapter,
        draft=ChainDraft(3),
        backend="reference",
        feature_head=head,
        device_pair=copying(),
    )
    out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, expected(reference_model, batch_inputs))
    assert out.stats["drafters"]["feature"]["row_rounds"] > 0
    assert out.stats["transfers"] == 1  # the free tokens; the head's rounds stay on the target's side


@pytest.mark.parametrize("slow", ["target", "drafter"])
def test_free_tokens_on_two_clocks(reference_model, target, batch_inputs, slow, monkeypatch):
    """With the drafter on its own clock (as on its own device; emulated here with a second CPU
    timer) a draft is free when its step ended, in host time, before the target's prefill did:
    all 8 while the video tower waits for them, none when the drafter starts after the prefill."""
    from crossspec_kernels.runtime.engine import _Run
    from crossspec_kernels.runtime.stages import StageTimer

    original = _Run.__init__

    def two_clocks(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.drafter_timer = self.drafter.timer = StageTimer(CPU)

    monkeypatch.setattr(_Run, "__init__", two_clocks)
    inputs = tm.single_row(batch_inputs, 0)
    drafter = tm.tiny_video_llava(seed=0)  # the target itself
    forwards, drafted, prefilled = [], threading.Event(), threading.Event()

    def count(*_):
        forwards.append(1)
        if len(forwards) == 8:  # the prompt, then 7 fed drafts: the 8th draft is scored next
            drafted.set()

    def slow_tower(*_):
        assert drafted.wait(timeout=60), "the drafter never drafted while the target prefilled"
        time.sleep(0.2)

    def wait_for_target(*_):
        assert prefilled.wait(timeout=60)
        time.sleep(0.1)

    if slow == "target":
        tower = target.get_submodule("model.video_tower")
        hooks = [tower.register_forward_pre_hook(slow_tower), drafter.model.register_forward_hook(count)]
    else:
        hooks = [
            target.model.register_forward_hook(lambda *_: prefilled.set()),
            drafter.model.register_forward_pre_hook(wait_for_target),
        ]
    try:
        engine = CrossSpecEngine(
            target, drafter, draft=ChainDraft(4), free_token_budget=8, backend="reference"
        )
        out = engine.generate(inputs, dict(inputs), max_new_tokens=NEW_TOKENS)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(out.sequences, expected(reference_model, inputs))
    stats = out.stats
    assert stats["free_tokens"] == (8 if slow == "target" else 0)
    assert (
        stats["stage_ms"]["draft.step"] > 0 and stats["stage_ms"]["draft.prefill"] > 0
    )  # the drafter's clock


# ----------------------------------------------------------------------------------------------
# Bad device arguments (CPU: devices that cannot run are stood in for by "meta")
# ----------------------------------------------------------------------------------------------


def test_bad_device_arguments(target, batch_inputs):
    drafter, drafter_inputs, adapter = adapter_drafter(2)
    with pytest.raises(ValueError, match="adapter is on meta but the drafter is on cpu"):
        CrossSpecEngine(target, drafter, LinearAdapter(adapter.config).to("meta"))
    with pytest.raises(
        ValueError, match="drafter is on meta; a drafter on its own device must be on 'cpu' or 'cuda"
    ):
        CrossSpecEngine(target, tm.tiny_llama(seed=7, head_dim=8).to("meta"), LinearAdapter(adapter.config))
    torch.manual_seed(0)
    head = FeatureHead(feature_head_config(target.config, "b1")).eval()
    head.load_embedding(target.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="feature_head is on meta but the target is on cpu"):
        CrossSpecEngine(target, None, feature_head=head.to("meta"))
    with pytest.raises(ValueError, match="device_pair must be a runtime.devices.DevicePair"):
        CrossSpecEngine(target, drafter, adapter, device_pair=(CPU, CPU))
    for kind in ("l5", "l5f"):
        torch.manual_seed(0)
        event_head = FeatureHead(feature_head_config(target.config, kind, d_draft=32)).eval()
        event_head.load_embedding(target.get_input_embeddings().weight)
        with pytest.raises(
            ValueError, match=f"kind '{kind}' reads the event drafter's features every draft step"
        ):
            CrossSpecEngine(target, drafter, adapter, feature_head=event_head, device_pair=copying())


# ----------------------------------------------------------------------------------------------
# Real devices (GPU machines)
# ----------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_pair_round_trips_through_pinned_buffers_without_a_device_sync():
    gpu = torch.device("cuda", 0)
    stream = torch.cuda.Stream(gpu)
    pair = DevicePair(gpu, CPU).bind(None, stream)
    with torch.cuda.stream(stream):
        made = torch.arange(1000, device=gpu) * 3  # queued on the target's stream
    host = pair.to_drafter((made, None))
    assert host[0].device == CPU and host[0].is_pinned() and torch.equal(host[0], torch.arange(1000) * 3)
    back = pair.to_target(host[0] + 1)
    with torch.cuda.stream(stream):
        assert back.device == gpu and torch.equal(back, made + 1)
    assert pair.transfers == 2 and pair.moved_bytes == 2 * 1000 * 8


def _cuda_engine_run(batch_inputs, target_device, drafter_device, draft, backend="reference", **generate):
    """The engine with its target on ``target_device`` and its drafter on ``drafter_device``."""
    target = tm.tiny_video_llava(seed=0).to(target_device)
    inputs = {name: value.to(target_device) for name, value in batch_inputs.items()}
    drafter = tm.perturbed(tm.tiny_video_llava(seed=0), 0.3, seed=5).to(drafter_device)
    drafter_inputs = {name: value.to(drafter_device) for name, value in batch_inputs.items()}
    engine = CrossSpecEngine(target, drafter, draft=draft, backend=backend)
    out = engine.generate(inputs, drafter_inputs, max_new_tokens=NEW_TOKENS, **generate)
    stats = out.stats
    assert (stats["device"], stats["drafter_device"]) == (str(target_device), str(drafter_device))
    assert stats["transfers"] == 2 * stats["rounds"] - 1 and stats["transfer_bytes"] > 0
    assert not stats["fallback"], stats["fallback_reason"]
    return engine, inputs, drafter_inputs, out


def _target_alone(inputs: dict, **kwargs) -> torch.Tensor:
    reference = tm.tiny_video_llava(seed=0).to(inputs["input_ids"].device)  # never given to an engine
    out = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :]


@needs_cuda
@pytest.mark.parametrize(
    "draft, backend",
    [(ChainDraft(3), "reference"), (TreeDraft(2, 3, 5), "reference"), (ChainDraft(3), "triton")],
)
def test_cuda_target_beside_a_cpu_drafter(batch_inputs, draft, backend):
    """Greedy equals generate; backend="triton" runs the target's kernels, the drafter's CPU defaults."""
    gpu = torch.device("cuda", 0)
    engine, inputs, drafter_inputs, out = _cuda_engine_run(batch_inputs, gpu, CPU, draft, backend)
    assert torch.equal(out.sequences, _target_alone(inputs))
    assert engine.drafter_lm_head_weight.device == CPU
    with pytest.raises(ValueError, match=r"drafter_inputs\['input_ids'\] is on cuda:0, the drafter on cpu"):
        engine.generate(inputs, inputs, max_new_tokens=2)


@needs_cuda
def test_cuda_target_beside_a_cpu_drafter_coupled_sampling(batch_inputs):
    gpu, seed = torch.device("cuda", 0), [3, 2**64 - 1]
    *_, inputs, _, out = _cuda_engine_run(
        batch_inputs,
        gpu,
        CPU,
        ChainDraft(4),
        temperature=TEMPERATURE,
        seed=seed,
        sampling="coupled",
        eos_token_id=[],
    )
    processor = CoupledSampling(seed, TEMPERATURE, inputs["input_ids"].shape[1])
    alone = _target_alone(inputs, logits_processor=LogitsProcessorList([processor]), eos_token_id=None)
    assert torch.equal(out.sequences, alone)


@needs_cuda
def test_cuda_bad_device_arguments():
    target = tm.tiny_video_llava(seed=0).cuda()
    drafter = tm.tiny_video_llava(seed=1)  # on the CPU
    with pytest.raises(
        ValueError, match="device_pair is DevicePair.* but the target is on cuda:0 and the drafter on cpu"
    ):
        CrossSpecEngine(target, drafter, device_pair=DevicePair("cuda:0"))
    with pytest.raises(ValueError, match="adapter is on cuda:0 but the drafter is on cpu"):
        CrossSpecEngine(target, drafter, torch.nn.Linear(64, 64).cuda())
    with pytest.raises(ValueError, match="step_mode='cuda_graph' needs CUDA graph capture \\(drafter\\)"):
        CrossSpecEngine(target, drafter, step_mode="cuda_graph")
    with pytest.raises(ValueError, match="streams are for CUDA models; the drafter is on cpu"):
        CrossSpecEngine(target, drafter, streams=(torch.cuda.Stream(), torch.cuda.Stream()))
    torch.manual_seed(0)
    head = FeatureHead(feature_head_config(target.config, "l5", d_draft=64)).eval()
    head.load_embedding(target.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="kind 'l5' reads the event drafter's features"):
        CrossSpecEngine(target, drafter, feature_head=head.cuda())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_drafter_on_a_second_gpu(batch_inputs):
    first, second = torch.device("cuda", 0), torch.device("cuda", 1)
    *_, inputs, _, out = _cuda_engine_run(batch_inputs, first, second, ChainDraft(3))
    assert torch.equal(out.sequences, _target_alone(inputs))
