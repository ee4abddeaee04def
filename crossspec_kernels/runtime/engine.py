"""CrossSpecEngine: lossless cross-modal speculative generation with prefill hiding.

One request batch, start to end:

1. Prefill hiding. The target's prefill (vision tower + LLM over the prompt) starts in a worker
   thread on the target's CUDA stream (on CPU: in the thread alone). Meanwhile the drafter, on a
   high-priority stream, prefills its own prompt (the event frames) and drafts a chain, checking
   without blocking whether the target's prefill has finished, until it has or
   ``free_token_budget`` tokens are drafted. Drafts finished before the target's prefill are
   counted as free tokens.
2. Rounds. The target verifies the drafts in one forward over [root + draft nodes] with the tree
   mask (the first round's root, the last prompt token, is already in its cache), ``verify``
   accepts the longest agreeing path plus one correction/bonus token, ``compact_kv`` moves the
   accepted tree nodes next to the root in the target's cache, and the drafter catches up on the
   committed tokens in the first forward of its next round, then drafts a chain
   (``ChainDraft``) or a dynamic tree (``TreeDraft``).
3. A drafter that raises (an error, or running out of memory) never touches the output: the
   engine finishes with target-only decoding (rounds without drafts) and reports the fallback.

Host syncs: one per round, after ``verify``, reading each row's accepted count and end-of-sequence
position ([2, B] ints). The counts size the caches (Hugging Face caches keep host-side lengths) and
decide when to stop; nothing else in a round reads device values.

Greedy output equals ``target.generate(**target_inputs, do_sample=False)`` token for token (up to
floating-point near-ties between the one-token and the many-token forward). Sampling
(temperature > 0) draws from softmax(logits / temperature) exactly, through recursive rejection
sampling; HF's ``generate`` adds top-k 50 unless told ``top_k=0``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from crossspec_kernels import hf
from crossspec_kernels.models.adapters import BottleneckAdapter, EagleAdapter, LinearAdapter
from crossspec_kernels.ops.compact_kv import compact_kv
from crossspec_kernels.ops.verify import verify
from crossspec_kernels.runtime.controlled import ControlledAcceptance
from crossspec_kernels.runtime.draft_config import MAX_DRAFT_NODES, ChainDraft, TreeDraft
from crossspec_kernels.runtime.drafting import DraftModel, Proposal
from crossspec_kernels.runtime.lane import Lane
from crossspec_kernels.runtime.stages import StageTimer

logger = logging.getLogger(__name__)
_OP = "CrossSpecEngine"
# Modules whose forward is the target's vision encoder, timed as the "target.vision" stage.
_VISION_TOWERS = ("video_tower", "image_tower", "vision_tower")


@dataclass
class GenerateOutput:
    """``sequences`` [B, T]: the new tokens only, as ``target.generate(...)[:, prompt_len:]``, rows
    that ended early padded with the pad token. ``stats``: see :meth:`CrossSpecEngine.generate`."""

    sequences: torch.Tensor
    stats: dict = field(default_factory=dict)


class _Fallback(Exception):
    """The drafter failed; carries the original error."""


class CrossSpecEngine:
    """Cross-modal speculative decoding of an HF target with an HF drafter.

    Args:
        target: a causal VLM or LM (``VideoLlavaForConditionalGeneration`` first) whose output
            embeddings are its LM head. Its language model is switched to the "crossspec"
            attention (``crossspec_kernels.hf.enable``), which computes the same attention.
        drafter: any HF model whose forward returns hidden states (the EventGPT-style drafter, a
            LLaVA, a plain causal LM); also switched to "crossspec" attention (trees need it).
        adapter: maps the drafter's final hidden state into the target's (``LinearAdapter``,
            ``BottleneckAdapter``) or None (identity: hidden sizes must match).
        draft: ``ChainDraft(gamma)`` (default gamma 5) or ``TreeDraft(top_k, depth, max_nodes)``.
        free_token_budget: at most this many tokens are drafted while the target prefills.
        backend: forces the kernels' backend ("reference" runs everything in plain PyTorch; "cuda"
            applies to verify, which has a CUDA C++ kernel, the other ops then use triton); None
            lets each op pick from the device.
        overlap: False makes the drafter wait for the target's prefill (the sequential baseline
            of the overlap benchmark); nothing is drafted for free then.
        streams: CUDA only: (drafter stream, target stream) to run on instead of the two the engine
            makes (a high-priority one and a normal one), e.g. streams of SM-partitioned green
            contexts (``crossspec_kernels.runtime.partition``).
    """

    def __init__(
        self,
        target: torch.nn.Module,
        drafter: torch.nn.Module,
        adapter: torch.nn.Module | None = None,
        *,
        draft: ChainDraft | TreeDraft | None = None,
        free_token_budget: int = 16,
        backend: str | None = None,
        overlap: bool = True,
        streams: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None,
    ) -> None:
        draft = ChainDraft() if draft is None else draft
        if backend not in (None, "cuda", "triton", "reference"):
            raise ValueError(f"{_OP}: backend must be None, 'cuda', 'triton' or 'reference', got {backend!r}")
        if not isinstance(draft, (ChainDraft, TreeDraft)):
            raise ValueError(f"{_OP}: draft must be a ChainDraft or TreeDraft, got {type(draft).__name__}")
        if (
            isinstance(free_token_budget, bool)
            or not isinstance(free_token_budget, int)
            or not 1 <= free_token_budget <= MAX_DRAFT_NODES
        ):
            raise ValueError(
                f"{_OP}: free_token_budget must be an int in [1, {MAX_DRAFT_NODES}], got {free_token_budget!r}"
            )
        head = _output_embeddings(target, "target")
        d_target = _hidden_size(target, "target")
        d_drafter = _hidden_size(drafter, "drafter")
        if not callable(getattr(drafter, "get_input_embeddings", None)):
            raise ValueError(f"{_OP}: drafter must be an HF model with get_input_embeddings()")
        if adapter is None:
            if d_drafter != d_target:
                raise ValueError(
                    f"{_OP}: adapter=None needs equal hidden sizes, got drafter {d_drafter} and target "
                    f"{d_target}; pass an adapter (crossspec_kernels.models.adapters)"
                )
        elif isinstance(adapter, EagleAdapter):
            raise ValueError(
                f"{_OP}: EagleAdapter needs a window of previous positions per draft and is not supported "
                "by the engine yet; use a LinearAdapter or BottleneckAdapter"
            )
        elif not isinstance(adapter, (LinearAdapter, BottleneckAdapter)):
            raise ValueError(
                f"{_OP}: adapter must be a LinearAdapter, BottleneckAdapter or None, got {type(adapter).__name__}"
            )
        elif (adapter.config.d_draft, adapter.config.d_target) != (d_drafter, d_target):
            raise ValueError(
                f"{_OP}: adapter maps {adapter.config.d_draft} -> {adapter.config.d_target}, but the drafter's "
                f"hidden size is {d_drafter} and the target's {d_target}"
            )
        self.device = head.weight.device
        for name, model in (("drafter", drafter), ("adapter", adapter)):
            device = _device_of(model)
            if device is not None and device != self.device:
                raise ValueError(f"{_OP}: {name} is on {device} but the target is on {self.device}")
        self.target = hf.enable(target)
        self.drafter = hf.enable(drafter)
        self.adapter = adapter
        self.draft = draft
        self.free_token_budget = free_token_budget
        self.backend = backend
        if not isinstance(overlap, bool):
            raise ValueError(f"{_OP}: overlap must be a bool, got {overlap!r}")
        self.overlap = overlap
        self.streams = _check_streams(streams, self.device)
        self.lm_head_weight = head.weight

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        target_inputs: Mapping,
        drafter_inputs: Mapping,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        profile: bool | str = False,
        controlled_acceptance: ControlledAcceptance | None = None,
    ) -> GenerateOutput:
        """Generate up to ``max_new_tokens`` tokens per row.

        Args:
            target_inputs: what ``target.generate`` takes: input_ids [B, T] (left padded),
                attention_mask, pixel_values_videos, ...
            drafter_inputs: the drafter's prompt: input_ids [B, T'] (left padded), attention_mask,
                and its event inputs (e.g. event_pixel_values).
            temperature: 0 = greedy; > 0 samples softmax(logits / temperature).
            seed: keys the verification noise (Philox) and the drafter's sampling.
            eos_token_id: int or list; None = the target's generation_config.eos_token_id; []
                disables stopping at end of sequence.
            pad_token_id: fills rows that ended early; None = the target's generation_config
                pad_token_id, else the first eos id, else 0.
            profile: True writes a torch profiler trace to ./crossspec_trace.json; a string names
                the file. Its path is stats["trace"].
            controlled_acceptance: benchmarks only: replace each chain draft by the target's own
                token with a chosen probability (``runtime.controlled``); greedy chains only.

        Returns:
            GenerateOutput(sequences [B, T], stats) with stats: acceptance_rate (accepted drafts /
            drafted depth: accepted/gamma per round for chains, accepted/depth for trees),
            mean_accepted_length (draft tokens accepted per round and row; each round also commits
            one target token), tokens_per_round, free_tokens (drafted before the target's prefill
            finished), free_tokens_accepted, ttft_ms, tokens_per_s, total_ms, stage_ms (per NVTX
            stage; target.prefill includes target.vision), rounds, fallback, fallback_reason,
            device.
        """
        run = _Run(
            self, target_inputs, drafter_inputs, max_new_tokens, temperature, seed, eos_token_id, pad_token_id
        )
        run.set_controlled_acceptance(controlled_acceptance)
        trace_path = None if profile is False else ("crossspec_trace.json" if profile is True else profile)
        if trace_path is not None and not isinstance(trace_path, str):
            raise ValueError(f"{_OP}.generate: profile must be a bool or a file path, got {profile!r}")
        profiler = contextlib.nullcontext()
        if trace_path is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities, experimental_config=_all_threads())
        with profiler as prof:
            output = run.execute()
        if trace_path is not None:
            prof.export_chrome_trace(trace_path)
            output.stats["trace"] = trace_path
        return output


# ----------------------------------------------------------------------------------------------
# One generate() call
# ----------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, engine, target_inputs, drafter_inputs, max_new_tokens, temperature, seed, eos, pad):
        self.engine = engine
        self.target_inputs, self.drafter_inputs = _check_inputs(engine, target_inputs, drafter_inputs)
        self.batch = self.target_inputs["input_ids"].shape[0]
        self.max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
        self.temperature = _check_temperature(temperature)
        self.seed = _check_int("seed", seed, 0)
        vocab = engine.lm_head_weight.shape[0]
        self.eos = _eos_ids(engine.target, eos, vocab)
        self.pad = _pad_id(engine.target, self.eos, pad, vocab)
        self.device = engine.device
        self.timer = StageTimer(self.device)
        self.target = Lane(engine.target, "target")
        # Ops without a CUDA C++ kernel run on triton when verify is forced onto "cuda".
        self._kernel_backend = "triton" if engine.backend == "cuda" else engine.backend
        self.drafter = DraftModel(
            engine.drafter, engine.adapter, engine.lm_head_weight, self.timer, backend=self._kernel_backend
        )
        self.generator = None
        if self.temperature > 0:
            self.generator = torch.Generator(self.device).manual_seed(self.seed)
        self.drafter_stream, self.target_stream = None, None
        if engine.streams is not None:
            self.drafter_stream, self.target_stream = engine.streams
        elif self.device.type == "cuda":
            self.target_stream = torch.cuda.Stream(self.device)
            # Lower number = higher priority: the drafter's small kernels go first when both are queued.
            high = torch.cuda.Stream.priority_range()[1]
            self.drafter_stream = torch.cuda.Stream(self.device, priority=high)
        self.committed = torch.zeros(self.batch, dtype=torch.int64, device=self.device)  # uncapped
        self.override = None
        self.fallback_reason = None
        self.new_tokens = torch.full(
            (self.batch, self.max_new_tokens), self.pad, dtype=torch.int64, device=self.device
        )
        self.lengths = [0] * self.batch
        self.finished = [False] * self.batch
        self.rounds = 0
        self.accepted = self.depth_total = self.row_rounds = self.drafted_row_rounds = 0
        self.first_accepted = [0] * self.batch

    def set_controlled_acceptance(self, controlled: ControlledAcceptance | None) -> None:
        if controlled is None:
            return
        if not isinstance(controlled, ControlledAcceptance):
            raise ValueError(
                f"{_OP}.generate: controlled_acceptance must be a ControlledAcceptance, got {type(controlled).__name__}"
            )
        if self.temperature != 0 or not isinstance(self.engine.draft, ChainDraft):
            raise ValueError(f"{_OP}.generate: controlled_acceptance needs greedy decoding and a ChainDraft")
        controlled.check(self.batch, self.drafter.shared_vocab, self.device)
        # Draft `step` of a round proposes new token number committed + step.
        self.override = lambda token, step: controlled.apply(token, self.committed + step)

    # streams ----------------------------------------------------------------------------------
    def _on(self, stream):
        return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)

    def _join(self, waiting, producer) -> None:
        """``waiting`` stream orders itself after everything queued on ``producer`` (an event)."""
        if waiting is not None:
            waiting.wait_stream(producer)

    # the drafter, guarded ----------------------------------------------------------------------
    def _drafter_call(self, fn, *args, **kwargs):
        if self.fallback_reason is not None:
            return None
        try:
            with self._on(self.drafter_stream):
                return fn(*args, **kwargs)
        except Exception as error:  # an OOM or any bug in the drafter: finish without it
            self.fallback_reason = f"{type(error).__name__}: {error}"
            logger.warning("crossspec: the drafter failed (%s); finishing with target-only decoding", error)
            return None

    # ------------------------------------------------------------------------------------------
    def execute(self) -> GenerateOutput:
        with hf.attention_backend(self._kernel_backend):
            return self._execute()

    def _execute(self) -> GenerateOutput:
        start = time.perf_counter()
        if self.device.type == "cuda":
            for stream in (self.target_stream, self.drafter_stream):
                stream.wait_stream(torch.cuda.current_stream(self.device))

        proposal = self._prefill_phase()
        self._round(proposal, root_in_cache=True, first=True)
        first_tokens = time.perf_counter()
        while not all(self.finished):
            proposal = None
            if self.fallback_reason is None:
                hidden = self._drafter_call(self.drafter.catch_up, self.pending, self.pending_valid)
                if hidden is not None:
                    proposal = self._drafter_call(self._propose, hidden)
            self._round(proposal, root_in_cache=False)

        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_stream(self.target_stream)
        total = max(self.lengths)
        sequences = self.new_tokens[:, :total].clone()
        end = time.perf_counter()
        stats = self._stats(start, first_tokens, end)
        return GenerateOutput(sequences, stats)

    def _propose(self, hidden) -> Proposal:
        config = self.engine.draft
        if isinstance(config, TreeDraft):
            return self.drafter.tree(hidden, config)
        return self.drafter.chain(
            hidden, config, temperature=self.temperature, generator=self.generator, override=self.override
        )

    # prefill hiding ---------------------------------------------------------------------------
    def _prefill_phase(self):
        state = {}
        worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossspec-target")
        future = worker.submit(self._target_prefill, state)

        def prefill_done() -> bool:
            if not future.done():
                return False
            end = state.get("end")
            return end is None or not isinstance(end, torch.cuda.Event) or end.query()

        budget = min(self.engine.free_token_budget, self.max_new_tokens)
        if not self.engine.overlap:
            # Sequential: the target's prefill first, then a first draft as long as a round's.
            future.result()
            config = self.engine.draft
            budget = min(
                config.gamma if isinstance(config, ChainDraft) else config.depth, self.max_new_tokens
            )

        def should_stop(timestamps) -> bool:
            if len(timestamps) >= budget or not self.engine.overlap:
                return len(timestamps) >= budget
            if self.device.type == "cuda":
                # Keep at most two steps in flight so drafting stops soon after the prefill does.
                while len(timestamps) >= 2 and not (prefill_done() or timestamps[-2].query()):
                    time.sleep(20e-6)
            return prefill_done()

        proposal = None
        hidden = self._drafter_call(self.drafter.prefill, self.drafter_inputs)
        if hidden is not None:
            proposal = self._drafter_call(
                self.drafter.chain,
                hidden,
                ChainDraft(budget),
                temperature=self.temperature,
                generator=self.generator,
                should_stop=should_stop,
                override=self.override,
            )
        try:
            future.result()
        finally:
            worker.shutdown()
        self.root_logits = state["root_logits"]
        # Which drafts were free is read at the end (CUDA event times need a sync).
        self.prefill_marks = (state["start"], state["end"], [] if proposal is None else proposal.timestamps)
        return proposal

    def _target_prefill(self, state: dict) -> None:
        timer = self.timer
        backend = "reference" if self.device.type == "cpu" else self._kernel_backend
        with contextlib.ExitStack() as stack:
            if self.target_stream is not None:
                stack.enter_context(torch.cuda.device(self.device))
                stack.enter_context(torch.cuda.stream(self.target_stream))
            if backend is not None:
                # Triton's CPU interpreter is not thread-safe: the drafter's thread owns it.
                stack.enter_context(hf.attention_backend(backend))
            stack.enter_context(_timed_towers(self.engine.target, timer))
            state["start"] = timer.mark()
            with torch.no_grad(), timer.stage("target.prefill"):
                out = self.target.prefill(self.target_inputs, hidden=False)
            state["root_logits"] = out.logits[:, -1]
            state["end"] = timer.mark()

    # one verification round -------------------------------------------------------------------
    def _round(self, proposal: Proposal | None, *, root_in_cache: bool, first: bool = False) -> None:
        target = self.target
        batch, device = self.batch, self.device
        if proposal is None:
            empty = torch.empty(batch, 0, dtype=torch.int64, device=device)
            proposal = Proposal(
                empty, None, empty, torch.empty(batch, 0, 0, dtype=torch.bool, device=device), None, 0, 0, []
            )
        num_nodes = proposal.tokens.shape[1]
        self._join(self.target_stream, self.drafter_stream)
        _handoff(proposal, self.target_stream)
        with self._on(self.target_stream):
            slots_before = target.physical_length
            real = target.real_lengths()[:, None]
            with self.timer.stage("verify.forward"):
                if root_in_cache:
                    block, positions, tree = proposal.tokens, real - 1 + proposal.depth, proposal.tree_mask
                    root_slot = slots_before - 1
                else:
                    block = torch.cat([self.root[:, None], proposal.tokens], 1)
                    zero = torch.zeros(batch, 1, dtype=proposal.depth.dtype, device=device)
                    positions = real + torch.cat([zero, proposal.depth], 1)
                    tree = _with_root(proposal.tree_mask)
                    root_slot = slots_before
                logits = None
                if block.shape[1] > 0:
                    causal = proposal.parents is None  # a chain: the kernel's causal path, no mask
                    out = target.extend(block, positions, tree_mask=None if causal else tree)
                    logits = out.logits
                if root_in_cache:
                    rows = [self.root_logits[:, None]] + ([logits] if logits is not None else [])
                    logits = torch.cat(rows, 1)
            with self.timer.stage("verify.accept"):
                result = verify(
                    logits,
                    proposal.tokens,
                    proposal.parents,
                    proposal.draft_probs,
                    temperature=self.temperature,
                    seed=self.seed,
                    offset=self.rounds,
                    validate_tree=False,
                    backend=self.engine.backend,
                )
            if proposal.parents is not None and num_nodes > 0:
                with self.timer.stage("kv.compact"):
                    compact_kv(
                        target.cache,
                        result.path,
                        result.num_accepted,
                        root_slot,
                        crop=False,
                        backend=self._kernel_backend,
                    )
            committed = result.num_accepted + 1
            in_round = torch.arange(num_nodes + 1, device=device) < committed[:, None]
            is_eos = in_round & torch.isin(result.tokens, self.eos)
            first_eos = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), -1)
            accepted, eos_at = torch.stack([result.num_accepted, first_eos]).tolist()  # the round's sync

            kept = result.num_accepted + (0 if root_in_cache else 1)
            ragged = min(accepted) != max(accepted)
            target.keep(slots_before, kept, root_slot + 1 + max(accepted), ragged=ragged)
            self.root = result.tokens.gather(1, result.num_accepted[:, None])[:, 0]
            self.committed = self.committed + committed
            # On the target stream, like the tensors it copies from (the allocator may reuse them).
            self._commit(result.tokens, accepted, eos_at, num_nodes, proposal, first)

        if self.fallback_reason is None:
            self._join(self.drafter_stream, self.target_stream)
            _handoff(result, self.drafter_stream)
            self._drafter_call(self._next_pending, result, accepted, proposal)
        self.rounds += 1

    def _commit(self, tokens, accepted, eos_at, num_nodes, proposal, first) -> None:
        depth = num_nodes if proposal.parents is None else self._tree_depth()
        for row in range(self.batch):
            if self.finished[row]:
                continue
            self.row_rounds += 1
            if num_nodes > 0:
                self.accepted += accepted[row]
                self.depth_total += depth
                self.drafted_row_rounds += 1
            if first:
                self.first_accepted[row] = accepted[row]
            take = accepted[row] + 1 if eos_at[row] < 0 else eos_at[row] + 1
            take = min(take, self.max_new_tokens - self.lengths[row])
            start = self.lengths[row]
            self.new_tokens[row, start : start + take] = tokens[row, :take]
            self.lengths[row] += take
            if eos_at[row] >= 0 or self.lengths[row] >= self.max_new_tokens:
                self.finished[row] = True

    def _tree_depth(self) -> int:
        config = self.engine.draft
        return min(config.depth, config.max_nodes)

    def _next_pending(self, result, accepted: list[int], proposal: Proposal) -> None:
        """Drafter bookkeeping: keep a chain's accepted drafts, queue the rest of the committed tokens."""
        # Sizes from the host copy of the counts, values from the device tensor: no extra sync.
        fed_host = [min(count, proposal.fed) for count in accepted]  # accepted drafts in its cache
        counts_host = [count + 1 - seen for count, seen in zip(accepted, fed_host)]  # unseen, >= 1
        fed = result.num_accepted.clamp(max=proposal.fed)
        if proposal.fed > 0:
            ragged = min(fed_host) != max(fed_host)
            self.drafter.lane.keep(proposal.fed_start, fed, proposal.fed_start + max(fed_host), ragged=ragged)
        width = max(counts_host)
        counts = result.num_accepted + 1 - fed
        column = torch.arange(width, device=self.device) - (width - counts[:, None])  # right-aligned
        source = (fed[:, None] + column.clamp_min(0)).clamp(max=result.tokens.shape[1] - 1)
        self.pending = result.tokens.gather(1, source)
        self.pending_valid = None if min(counts_host) == width else column >= 0

    # ------------------------------------------------------------------------------------------
    def _stats(self, start: float, first_tokens: float, end: float) -> dict:
        total_s = end - start
        generated = sum(self.lengths)
        stage_ms = self.timer.totals()  # synchronises on CUDA, so event times can be read now
        prefill_start, prefill_end, marks = self.prefill_marks
        prefill_ms = self.timer.elapsed_ms(prefill_start, prefill_end)
        free = sum(self.timer.elapsed_ms(prefill_start, mark) <= prefill_ms for mark in marks)
        return {
            "acceptance_rate": self.accepted / self.depth_total if self.depth_total else 0.0,
            "mean_accepted_length": self.accepted / self.drafted_row_rounds
            if self.drafted_row_rounds
            else 0.0,
            "tokens_per_round": generated / self.row_rounds if self.row_rounds else 0.0,
            "free_tokens": free,
            "free_tokens_accepted": sum(min(a, free) for a in self.first_accepted) / self.batch,
            "ttft_ms": (first_tokens - start) * 1e3,
            "tokens_per_s": generated / total_s if total_s > 0 else math.inf,
            "total_ms": total_s * 1e3,
            "stage_ms": stage_ms,
            "rounds": self.rounds,
            "fallback": self.fallback_reason is not None,
            "fallback_reason": self.fallback_reason,
            "device": str(self.device),
        }


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _check_streams(streams, device: torch.device):
    if streams is None:
        return None
    if device.type != "cuda":
        raise ValueError(f"{_OP}: streams are for CUDA models; the target is on {device}")
    if (
        not isinstance(streams, (tuple, list))
        or len(streams) != 2
        or not all(isinstance(stream, torch.cuda.Stream) for stream in streams)
    ):
        raise ValueError(f"{_OP}: streams must be (drafter stream, target stream), two torch.cuda.Stream")
    if any(stream.device != device for stream in streams):
        raise ValueError(f"{_OP}: streams must be on the models' device {device}")
    return tuple(streams)


def _handoff(tensors, stream) -> None:
    """Tensors made on one stream and read on ``stream``: keep the allocator from reusing their
    memory before ``stream`` is done with them."""
    if stream is None:
        return
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            tensor.record_stream(stream)


def _all_threads():
    """Profile the target's prefill thread too (torch >= 2.7); None: the calling thread only."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        return None


def _with_root(tree_mask: torch.Tensor) -> torch.Tensor:
    """[B, N, N] node visibility -> [B, N+1, N+1] with the root first (seen by every node)."""
    batch, num_nodes, _ = tree_mask.shape
    full = torch.zeros(batch, num_nodes + 1, num_nodes + 1, dtype=torch.bool, device=tree_mask.device)
    full[:, :, 0] = True
    full[:, 1:, 1:] = tree_mask
    return full


@contextlib.contextmanager
def _timed_towers(model: torch.nn.Module, timer: StageTimer):
    """Time the target's vision encoder(s) as "target.vision" through forward hooks."""
    towers = [
        module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in _VISION_TOWERS and module is not model
    ]
    open_ranges = []
    handles = []
    for tower in towers:
        handles.append(
            tower.register_forward_pre_hook(
                lambda *_: open_ranges.append(timer.begin("target.vision")), prepend=True
            )
        )
        handles.append(tower.register_forward_hook(lambda *_: timer.end(open_ranges.pop())))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _output_embeddings(model, name: str):
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{_OP}: {name} must be an HF model whose get_output_embeddings() is its LM head")
    return head


def _hidden_size(model, name: str) -> int:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{_OP}: {name} must be an HF model with a config, got {type(model).__name__}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def _device_of(model) -> torch.device | None:
    if model is None:
        return None
    for parameter in model.parameters():
        return parameter.device
    return None


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{_OP}.generate: {name} must be an int >= {low}, got {value!r}")
    return value


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"{_OP}.generate: temperature must be a float >= 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{_OP}.generate: temperature must be a finite float >= 0, got {temperature!r}")
    return float(temperature)


def _eos_ids(target, eos, vocab: int) -> torch.Tensor:
    device = target.get_output_embeddings().weight.device
    if eos is None:
        eos = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else eos
    ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids
    ):
        raise ValueError(f"{_OP}.generate: eos_token_id must be ints in [0, {vocab}), got {eos!r}")
    return torch.tensor(list(ids), dtype=torch.int64, device=device)


def _pad_id(target, eos: torch.Tensor, pad, vocab: int) -> int:
    if pad is not None:
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < vocab:
            raise ValueError(f"{_OP}.generate: pad_token_id must be an int in [0, {vocab}), got {pad!r}")
        return pad
    pad = getattr(getattr(target, "generation_config", None), "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    return int(eos[0]) if eos.numel() else 0


def _check_inputs(engine, target_inputs, drafter_inputs) -> tuple[dict, dict]:
    checked = []
    for name, inputs, model in (
        ("target_inputs", target_inputs, engine.target),
        ("drafter_inputs", drafter_inputs, engine.drafter),
    ):
        if not isinstance(inputs, Mapping):
            raise ValueError(
                f"{_OP}.generate: {name} must be a dict of model inputs, got {type(inputs).__name__}"
            )
        inputs = dict(inputs)
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{_OP}.generate: {name}['input_ids'] must be a [B, T >= 1] tensor, got {got}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{_OP}.generate: {name}['input_ids'] must be int64 or int32, got {ids.dtype}")
        if ids.device != engine.device:
            raise ValueError(
                f"{_OP}.generate: {name}['input_ids'] is on {ids.device}, the models on {engine.device}"
            )
        # The target's ids must index its vocabulary (its video placeholder is a vocabulary id). A
        # drafter may use placeholder ids past its vocabulary (EventGPT's event token): it checks them.
        vocab = model.get_input_embeddings().num_embeddings if name == "target_inputs" else None
        low, high = torch.aminmax(ids)
        if int(low) < 0 or (vocab is not None and int(high) >= vocab):
            bound = f"[0, {vocab})" if vocab is not None else ">= 0"
            raise ValueError(
                f"{_OP}.generate: {name}['input_ids'] must lie in {bound}, got values in [{int(low)}, {int(high)}]"
            )
        mask = inputs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"{_OP}.generate: {name}['attention_mask'] must have input_ids' shape {tuple(ids.shape)}, got {got}"
                )
            if not bool(mask[:, -1].all()):
                raise ValueError(
                    f"{_OP}.generate: {name} is right-padded; decoder-only generation needs left padding "
                    "(tokenizer padding_side='left')"
                )
        for reserved in ("past_key_values", "use_cache", "position_ids", "cache_position", "inputs_embeds"):
            if inputs.get(reserved) is not None:
                raise ValueError(
                    f"{_OP}.generate: {name} must not contain {reserved!r}; the engine manages it"
                )
            inputs.pop(reserved, None)
        checked.append(inputs)
    target_batch, drafter_batch = checked[0]["input_ids"].shape[0], checked[1]["input_ids"].shape[0]
    if target_batch != drafter_batch:
        raise ValueError(
            f"{_OP}.generate: target_inputs has batch {target_batch} but drafter_inputs has batch {drafter_batch}"
        )
    return checked[0], checked[1]
