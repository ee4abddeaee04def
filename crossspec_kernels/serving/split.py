"""The edge–cloud split: the event drafter in one Ray actor (the edge), the target in another (the cloud).

Events are 10–100 KB/s against 5–10 MB/s of RGB video, and the drafter reads only the events, so the
drafter sits next to the event camera and only drafts cross the network. Per round:

    edge (EdgeDrafter)                                   cloud (CloudVerifier)
    drafts [B, N] int32 (+ q [B, N, V_s] fp32) ───────►  Verifier.step: one target forward, verify
    DraftModel.pending/catch_up/chain          ◄───────  num_accepted [B] uint8, bonus token [B] int32

Everything else is reconstructed on each side: the verifier keeps its root (its own last bonus token),
the drafter rebuilds the round's committed tokens (its accepted drafts, then the bonus) and so the
output, which it hands to the user standing next to it. Both sides run the same bookkeeping
(``_Rows``: which rows stopped, at end of sequence or ``max_new_tokens``), so no flag crosses either.

Bytes per round (payload: the arrays' data; Ray's framing, a few hundred bytes, is not counted):

* edge → cloud: ``4·B·N`` (N = the round's drafts; the first round's N = the drafts made during
  the target's prefill), plus ``4·B·N·V_s`` for the draft probabilities when sampling with
  ``sampling="rejection"`` (V_s: the vocabulary ids the two models share). Greedy and
  ``sampling="coupled"`` send none: the coupled race noise is keyed by (seed, position, token) only,
  so the verifier recomputes it and verifies greedily on the perturbed target scores.
* cloud → edge: ``5·B`` (an accepted count and a correction/bonus token per row).
* once per request: the target's inputs (prompt ids, attention mask, video) edge → cloud, what a
  cloud-only run uploads too; the prefill's acknowledgement back carries no payload. Once per
  deployment the edge fetches the target's LM head (drafts are scored by it, ``DraftModel``).

Prefill hiding: the edge sends the request and, without waiting, prefills its drafter and drafts
until ``free_token_budget`` drafts exist or the cloud's acknowledgement of its prefill arrives; the
first round verifies them. Greedy output equals ``target.generate(..., do_sample=False)`` (and
``CrossSpecEngine.generate``) token for token, for any batch with left padding.

Network delay for benchmarks on one machine: every message carries its delivery time (send time +
``rtt_ms / 2``) and the receiver waits for it (``time.monotonic``, one clock per machine: on a real
two-node deployment pass ``rtt_ms=0`` and let the network delay).

A drafter that fails (an error, or non-finite hidden states) never touches the output: from then
on the edge sends no drafts and the cloud decodes alone, one token a round (``stats["fallback"]``).

Chains only (``ChainDraft``); a ``TreeDraft`` is refused. Python::

    import ray
    from crossspec_kernels.runtime import ChainDraft
    from crossspec_kernels.serving.split import SplitGenerator

    ray.init()
    split = SplitGenerator(target, drafter, draft=ChainDraft(gamma=4), rtt_ms=20.0)
    out = split.generate(target_inputs, drafter_inputs, max_new_tokens=32)
    out.sequences, out.stats["bytes"]                  # tokens [B, T]; bytes per direction per round
    split.close()

``drafter_options`` / ``verifier_options`` go to the actors' ``.options(...)``: e.g.
``{"resources": {"edge": 1}}`` and ``{"num_gpus": 1}`` put them on different nodes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import ray
import torch

from crossspec_kernels import hf_attention
from crossspec_kernels.runtime import checks
from crossspec_kernels.runtime.controlled import ControlledAcceptance
from crossspec_kernels.runtime.draft_config import MAX_DRAFT_NODES, ChainDraft, TreeDraft
from crossspec_kernels.runtime.drafting import DraftModel, Proposal
from crossspec_kernels.runtime.engine import GenerateOutput
from crossspec_kernels.runtime.round import Verdict, Verifier
from crossspec_kernels.runtime.runner import ModelRunner, attention_kernel, parameter_dtype
from crossspec_kernels.runtime.sampling import SAMPLING_MODES, CoupledNoise, CoupledSampler, StreamSampler
from crossspec_kernels.runtime.stages import StageTimer

_OP = "SplitGenerator"
ID_BYTES, PROB_BYTES, COUNT_BYTES = 4, 4, 1  # int32 token ids, fp32 probabilities, uint8 counts


def round_bytes(batch: int, num_drafts: int, shared_vocab: int | None = None) -> tuple[int, int]:
    """(edge → cloud, cloud → edge) payload bytes of one round: ``num_drafts`` drafts per row, with
    their probabilities over ``shared_vocab`` ids when given (``sampling="rejection"``)."""
    up = batch * num_drafts * ID_BYTES
    if shared_vocab is not None:
        up += batch * num_drafts * shared_vocab * PROB_BYTES
    return up, batch * (COUNT_BYTES + ID_BYTES)


def check_rtt(rtt_ms) -> float:
    if isinstance(rtt_ms, bool) or not isinstance(rtt_ms, (int, float)) or not math.isfinite(rtt_ms):
        raise ValueError(f"{_OP}: rtt_ms must be a finite number of milliseconds >= 0, got {rtt_ms!r}")
    if rtt_ms < 0:
        raise ValueError(f"{_OP}: rtt_ms must be >= 0 (0 = no injected delay), got {rtt_ms!r}")
    return float(rtt_ms)


# ----------------------------------------------------------------------------------------------
# The wire: what crosses, its size, its delivery time
# ----------------------------------------------------------------------------------------------


@dataclass
class Message:
    """One message between the actors: numpy ``arrays`` (the payload) and ``extra`` Python objects
    (the request's inputs and settings, once per request), delivered at ``deliver_at``."""

    arrays: dict[str, np.ndarray]
    extra: dict = field(default_factory=dict)
    deliver_at: float | None = None  # time.monotonic() seconds; None = no injected delay

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())


class DelayedLink:
    """The sending side of one direction: stamps each message with send time + ``rtt_ms / 2``."""

    def __init__(self, rtt_ms: float = 0.0) -> None:
        self.one_way_s = check_rtt(rtt_ms) / 2e3

    def send(self, arrays: dict[str, np.ndarray] | None = None, **extra) -> Message:
        deliver_at = time.monotonic() + self.one_way_s if self.one_way_s > 0 else None
        return Message(arrays or {}, extra, deliver_at)

    @staticmethod
    def arrived(message: Message) -> bool:
        return message.deliver_at is None or time.monotonic() >= message.deliver_at

    @staticmethod
    def receive(message: Message) -> Message:
        """Wait until ``message`` would have arrived; return it."""
        if message.deliver_at is not None:
            wait = message.deliver_at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        return message


def tensor_bytes(inputs: dict) -> int:
    """Bytes of the tensors in a model-input dict (what uploading the request costs)."""
    return sum(value.numel() * value.element_size() for value in inputs.values() if torch.is_tensor(value))


class _Rows:
    """Per-row bookkeeping both sides run on the same counts (the engine's ``_collect``): how many
    tokens each row keeps (up to its first end of sequence, at most ``max_new_tokens``)."""

    def __init__(self, batch: int, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        self.lengths = [0] * batch
        self.finished = [False] * batch
        self.tokens: list[list[int]] = [[] for _ in range(batch)]

    def commit(self, accepted: list[int], eos_at: list[int], committed: list[list[int]] | None = None):
        """Rows that finished in this round."""
        done = []
        for row, (count, eos) in enumerate(zip(accepted, eos_at)):
            if self.finished[row]:
                continue
            take = min(count + 1 if eos < 0 else eos + 1, self.max_new_tokens - self.lengths[row])
            if committed is not None:
                self.tokens[row] += committed[row][:take]
            self.lengths[row] += take
            if eos >= 0 or self.lengths[row] >= self.max_new_tokens:
                self.finished[row] = True
                done.append(row)
        return done


def _pack(model: torch.nn.Module | None):
    """What an actor is sent for a model. An HF model travels as (class, config, state dict) and is
    rebuilt there: unpickled whole through Ray, its vision tower stops recording hidden states
    (transformers' output capturing does not survive Ray's serialisation)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return _Recipe(type(model), model.config, model.state_dict())
    return model


@dataclass
class _Recipe:
    cls: type
    config: object
    state: dict

    def build(self) -> torch.nn.Module:
        first = next(iter(self.state.values()))
        dtype = next((t.dtype for t in self.state.values() if t.is_floating_point()), torch.float32)
        hf_attention.register()  # a config may name the "crossspec" attention already
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = self.cls(self.config)
        finally:
            torch.set_default_dtype(previous)
        model.load_state_dict(self.state)
        return model.to(first.device).eval()


def _unpack(packed):
    return packed.build() if isinstance(packed, _Recipe) else packed


# ----------------------------------------------------------------------------------------------
# The cloud: the target and its Verifier
# ----------------------------------------------------------------------------------------------


class CloudVerifier:
    """The target's side (a Ray actor): prefill on request, then one ``Verifier.step`` per round."""

    def __init__(self, target: torch.nn.Module, *, backend: str | None, num_threads: int | None) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        target = _unpack(target)
        self.target = hf_attention.enable(target.eval())
        self.lm_head = checks.output_embeddings(target, "target")
        self.device = self.lm_head.weight.device
        self.backend = backend
        self.runner = ModelRunner(target, kernel=attention_kernel(target, self.device, backend))
        self.link = DelayedLink()
        self.verifier: Verifier | None = None

    def set_rtt(self, rtt_ms: float) -> None:
        self.link = DelayedLink(rtt_ms)

    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight.detach()

    @torch.no_grad()
    def prefill(self, message: Message) -> Message:
        request = DelayedLink.receive(message).extra
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in request["inputs"].items()}
        settings = request["settings"]
        width = inputs["input_ids"].shape[1]
        self.runner.allocate(
            len(settings["seeds"]), width + settings["room"], self.lm_head.weight.dtype, self.device
        )
        eos = torch.tensor(settings["eos"], dtype=torch.int64, device=self.device)
        self.verifier = Verifier(
            self.runner,
            self.lm_head,
            eos,
            settings["temperature"],
            settings["seeds"],
            self.backend,
            settings["sampling"],
        )
        self.rows = _Rows(len(settings["seeds"]), settings["max_new_tokens"])
        self.root = None  # the first round's root is the prompt's last token
        self.verify_ms: list[float] = []
        self.verifier.prefill(inputs)
        return self.link.send()  # the acknowledgement: no payload

    @torch.no_grad()
    def verify(self, message: Message) -> Message:
        """One round: the drafts in, (accepted count, correction/bonus token) per row out."""
        arrays = DelayedLink.receive(message).arrays
        start = time.perf_counter()
        verdict = self.verifier.step(self.root, self._proposal(arrays))
        self.root = verdict.tokens.gather(1, verdict.num_accepted[:, None])[:, 0]
        for row in self.rows.commit(verdict.accepted, verdict.eos_at):
            self.verifier.finish(row)
        reply = {
            "num_accepted": np.asarray(verdict.accepted, dtype=np.uint8),
            "bonus": self.root.to(torch.int32).cpu().numpy(),
        }
        self.verify_ms.append((time.perf_counter() - start) * 1e3)
        return self.link.send(reply)

    def stats(self) -> dict:
        return {"verify_ms": list(self.verify_ms)}

    def _proposal(self, arrays: dict) -> Proposal:
        tokens = torch.from_numpy(arrays["tokens"]).to(self.device, torch.int64)
        batch, count = tokens.shape
        draft_probs = None
        if "draft_probs" in arrays:  # [B, N, V_s] -> verify's [B, N + 1, V] (no children below the last)
            probs = torch.from_numpy(arrays["draft_probs"]).to(self.device)
            draft_probs = probs.new_zeros(batch, count + 1, self.lm_head.weight.shape[0])
            draft_probs[:, :count, : probs.shape[2]] = probs
        depth = torch.arange(1, count + 1, device=self.device).expand(batch, count)
        tree_mask = (
            torch.ones(count, count, dtype=torch.bool, device=self.device).tril().expand(batch, -1, -1)
        )
        return Proposal(tokens, None, depth, tree_mask, draft_probs, 0, [])


# ----------------------------------------------------------------------------------------------
# The edge: the drafter, and the loop (it holds the request and hands out the tokens)
# ----------------------------------------------------------------------------------------------


class EdgeDrafter:
    """The event drafter's side (a Ray actor): drafts, ships them, commits what the cloud accepted."""

    def __init__(
        self,
        drafter: torch.nn.Module,
        adapter: torch.nn.Module | None,
        verifier,
        *,
        draft: ChainDraft,
        free_token_budget: int,
        backend: str | None,
        num_threads: int | None,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        drafter = _unpack(drafter)
        self.drafter = hf_attention.enable(drafter.eval())
        self.adapter = None if adapter is None else adapter.eval()
        self.device = next(drafter.parameters()).device
        self.verifier = verifier
        # Once per deployment: drafts are scored by the target's LM head.
        self.lm_head_weight = ray.get(verifier.lm_head_weight.remote()).to(self.device)
        self.draft, self.free_token_budget = draft, free_token_budget
        self.backend = "triton" if backend == "cuda" else backend
        self.runner = ModelRunner(drafter, kernel=attention_kernel(drafter, self.device, backend))
        self.link = DelayedLink()

    def set_rtt(self, rtt_ms: float) -> None:
        self.link = DelayedLink(rtt_ms)

    @torch.no_grad()
    def generate(self, target_inputs: dict, drafter_inputs: dict, settings: dict) -> dict:
        """One request (checked by ``SplitGenerator.generate``): {"sequences", "stats"}."""
        start = time.perf_counter()
        self._setup(drafter_inputs, settings)
        cloud_settings = {key: value for key, value in settings.items() if key != "controlled"}
        request = self.link.send(inputs=target_inputs, settings=cloud_settings)  # prompt and video
        ack = self.verifier.prefill.remote(request)
        proposal = self._free_drafts(drafter_inputs, ack)  # while the target prefills
        self.first_round_drafts = proposal.tokens.shape[1]
        first_reply = None
        while True:  # the round, seen from the edge
            reply = self.verifier.verify.remote(self._send(proposal))  # drafts out
            if first_reply is None:
                DelayedLink.receive(ray.get(ack))  # raises if the target's prefill failed
            verdict, committed = self._receive(ray.get(reply), proposal)  # (accepted, bonus) back
            first_reply = first_reply or time.perf_counter()
            if self._commit(verdict, committed):
                break
            proposal = self._next_drafts(verdict, proposal)
        end = time.perf_counter()
        return self._result(start, first_reply, end)

    # the round's parts -------------------------------------------------------------------------
    def _send(self, proposal: Proposal) -> Message:
        self.drafts_host = proposal.tokens.tolist()  # the edge keeps its drafts: the output is built here
        arrays = {"tokens": proposal.tokens.to(torch.int32).cpu().numpy()}
        if self.sampling == "rejection" and proposal.draft_probs is not None:  # verify needs q
            count = proposal.tokens.shape[1]
            arrays["draft_probs"] = (
                proposal.draft_probs[:, :count, : self.model.shared_vocab].float().cpu().numpy()
            )
        message = self.link.send(arrays)
        self.bytes_up.append(message.nbytes)
        return message

    def _receive(self, message: Message, proposal: Proposal) -> tuple[Verdict, list[list[int]]]:
        """The round's committed tokens (accepted drafts, then the bonus) as the Verifier's Verdict."""
        arrays = DelayedLink.receive(message).arrays
        self.bytes_down.append(message.nbytes)
        accepted = arrays["num_accepted"].astype(np.int64).tolist()
        bonus = arrays["bonus"].astype(np.int64).tolist()
        committed = [
            drafts[:count] + [last] for drafts, count, last in zip(self.drafts_host, accepted, bonus)
        ]
        eos_at = [next((i for i, t in enumerate(row) if t in self.eos), -1) for row in committed]
        num_accepted = torch.tensor(accepted, dtype=torch.int64, device=self.device)
        drafts = proposal.tokens
        column = torch.arange(drafts.shape[1] + 1, device=self.device)
        padded = torch.cat([drafts, torch.full_like(drafts[:, :1], -1)], 1)
        bonus_tokens = torch.tensor(bonus, dtype=torch.int64, device=self.device)[:, None]
        tokens = torch.where(
            column < num_accepted[:, None],
            padded,
            torch.where(column == num_accepted[:, None], bonus_tokens, -1),
        )
        return Verdict(tokens, num_accepted, accepted, eos_at, None), committed

    def _commit(self, verdict: Verdict, committed: list[list[int]]) -> bool:
        """Keep the round's tokens, mirror the verifier's state; True when every row is done."""
        self.rounds += 1
        for row in range(len(committed)):
            if not self.rows.finished[row]:
                self.row_rounds += 1
                self.drafted += len(self.drafts_host[row])
                self.accepted += verdict.accepted[row]
        for row in self.rows.commit(verdict.accepted, verdict.eos_at, committed):
            self.active_host[row] = False
            self.active[row] = False
        self.generated = self.generated + verdict.num_accepted + 1  # as Verifier.generated
        return all(self.rows.finished)

    def _next_drafts(self, verdict: Verdict, proposal: Proposal) -> Proposal:
        def chain() -> Proposal:
            pending = self.model.pending(verdict, self.active, self.active_host, proposal.fed)
            return self._chain(self._finite(self.model.catch_up(pending)), self.draft)

        return self._guarded(chain)

    def _guarded(self, drafts) -> Proposal:
        """``drafts()``, or, once the drafter has failed (an error, non-finite hidden states), no
        drafts: the cloud then decodes alone, one token a round, and the output is unchanged."""
        if self.fallback_reason is None:
            try:
                return drafts()
            except Exception as error:  # an OOM or any bug in the drafter: finish without it
                self.fallback_reason = f"{type(error).__name__}: {error}"
        return Proposal.empty(len(self.rows.lengths), self.device)

    @staticmethod
    def _finite(hidden: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(hidden).all()):  # a host read: the edge's round has one anyway
            raise FloatingPointError("the drafter's hidden states are not finite (NaN/inf)")
        return hidden

    def _free_drafts(self, drafter_inputs: dict, ack) -> Proposal:
        """Drafter prefill and a chain, until the budget is drafted or the cloud's prefill is done."""
        budget = min(self.free_token_budget, self.rows.max_new_tokens)
        seen = []

        def should_stop(timestamps) -> bool:
            if len(timestamps) >= budget:
                return True
            if not seen and ray.wait([ack], timeout=0)[0]:
                seen.append(ray.get(ack))
            return bool(seen) and DelayedLink.arrived(seen[0])

        def chain() -> Proposal:
            hidden = self._finite(self.model.prefill(drafter_inputs))
            return self._chain(hidden, ChainDraft(budget), should_stop=should_stop)

        return self._guarded(chain)

    def _chain(self, hidden, config: ChainDraft, should_stop=None) -> Proposal:
        return self.model.chain(
            hidden,
            config,
            temperature=self.temperature,
            sampler=self.sampler,
            position=self.generated,
            should_stop=should_stop,
            override=self.override,
        )

    # set-up and results ------------------------------------------------------------------------
    def _setup(self, drafter_inputs: dict, settings: dict) -> None:
        batch = len(settings["seeds"])
        width = drafter_inputs["input_ids"].shape[1]
        self.runner.allocate(
            batch, width + settings["room"], parameter_dtype(self.drafter, torch.float32), self.device
        )
        self.model = DraftModel(
            self.runner, self.adapter, self.lm_head_weight, StageTimer(self.device), self.backend
        )
        self.temperature, self.sampling = settings["temperature"], settings["sampling"]
        self.eos, self.pad = set(settings["eos"]), settings["pad"]
        self.sampler = None
        if self.temperature > 0:
            seeds = torch.tensor(settings["seeds"], dtype=torch.int64, device=self.device)
            self.sampler = (
                CoupledSampler(CoupledNoise(seeds, self.temperature))
                if self.sampling == "coupled"
                else StreamSampler(torch.Generator(self.device).manual_seed(settings["seeds"][0]))
            )
        self.override = None
        controlled = settings.get("controlled")
        if controlled is not None:  # benchmarks: draft step `step` proposes new token generated + step
            controlled.check(batch, self.model.shared_vocab, self.device)
            self.override = lambda token, step: controlled.apply(token, self.generated + step)
        self.rows = _Rows(batch, settings["max_new_tokens"])
        self.active = torch.ones(batch, dtype=torch.bool, device=self.device)
        self.active_host = [True] * batch
        self.generated = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.bytes_up: list[int] = []
        self.bytes_down: list[int] = []
        self.rounds = self.row_rounds = self.drafted = self.accepted = 0
        self.fallback_reason = None

    def _result(self, start: float, first_reply: float, end: float) -> dict:
        batch = len(self.rows.lengths)
        sequences = torch.full((batch, max(self.rows.lengths)), self.pad, dtype=torch.int64)
        for row, tokens in enumerate(self.rows.tokens):
            sequences[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        generated = sum(self.rows.lengths)
        total_s = end - start
        return {
            "sequences": sequences,
            "stats": {
                "rounds": self.rounds,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "mean_accepted_length": self.accepted / self.row_rounds if self.row_rounds else 0.0,
                "tokens_per_round": generated / self.row_rounds if self.row_rounds else 0.0,
                "first_round_drafts": self.first_round_drafts,
                "ttft_ms": (first_reply - start) * 1e3,
                "total_ms": total_s * 1e3,
                "tokens_per_s": generated / total_s if total_s > 0 else math.inf,
                "rtt_ms": self.link.one_way_s * 2e3,
                "fallback": self.fallback_reason is not None,
                "fallback_reason": self.fallback_reason,
                "bytes": {
                    "edge_to_cloud_per_round": list(self.bytes_up),
                    "cloud_to_edge_per_round": list(self.bytes_down),
                    "edge_to_cloud": sum(self.bytes_up),
                    "cloud_to_edge": sum(self.bytes_down),
                    "shared_vocab": self.model.shared_vocab,
                },
            },
        }


# ----------------------------------------------------------------------------------------------
# The face
# ----------------------------------------------------------------------------------------------


class SplitGenerator:
    """Speculative generation split over two Ray actors: the drafter (edge) and the target (cloud).

    Args:
        target, drafter, adapter: as ``CrossSpecEngine``'s (modules, sent once to their actors).
        draft: a ``ChainDraft`` (trees are not supported by the split).
        free_token_budget: at most this many drafts while the target prefills (the first round).
        rtt_ms: injected round-trip time (>= 0; half each way), see the module docstring.
        backend: kernels' backend, as ``CrossSpecEngine``'s.
        num_threads: torch threads per actor (None: leave torch's default).
        drafter_options, verifier_options: Ray ``.options(...)`` of the two actors (placement).

    Starts a local Ray unless one is initialised (``ray.init(address=...)`` first to join a cluster).
    """

    def __init__(
        self,
        target: torch.nn.Module,
        drafter: torch.nn.Module,
        adapter: torch.nn.Module | None = None,
        *,
        draft: ChainDraft | None = None,
        free_token_budget: int = 32,
        rtt_ms: float = 0.0,
        backend: str | None = None,
        num_threads: int | None = 1,
        drafter_options: dict | None = None,
        verifier_options: dict | None = None,
    ) -> None:
        draft = ChainDraft() if draft is None else draft
        if isinstance(draft, TreeDraft):
            raise ValueError(
                f"{_OP}: draft must be a ChainDraft; tree drafts (TreeDraft) are not supported across the "
                "split (use CrossSpecEngine on one device for trees)"
            )
        if not isinstance(draft, ChainDraft):
            raise ValueError(f"{_OP}: draft must be a ChainDraft, got {type(draft).__name__}")
        checks.check_free_token_budget(_OP, free_token_budget, MAX_DRAFT_NODES)
        checks.check_backend(_OP, backend)
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise ValueError(f"{_OP}: num_threads must be None or an int >= 1, got {num_threads!r}")
        self.rtt_ms = check_rtt(rtt_ms)
        checks.check_drafter(drafter, adapter, target)
        self.target, self.drafter = target, drafter
        self.device = checks.output_embeddings(target, "target").weight.device
        self.draft, self.free_token_budget = draft, free_token_budget
        if not ray.is_initialized():
            ray.init()
        self.verifier = (
            ray.remote(CloudVerifier)
            .options(**(verifier_options or {}))
            .remote(_pack(target), backend=backend, num_threads=num_threads)
        )
        self.edge = (
            ray.remote(EdgeDrafter)
            .options(**(drafter_options or {}))
            .remote(
                _pack(drafter),
                adapter,
                self.verifier,
                draft=draft,
                free_token_budget=free_token_budget,
                backend=backend,
                num_threads=num_threads,
            )
        )
        self.set_rtt(self.rtt_ms)

    def set_rtt(self, rtt_ms: float) -> None:
        """Change the injected round-trip time (both directions) for the next requests."""
        self.rtt_ms = check_rtt(rtt_ms)
        ray.get([self.verifier.set_rtt.remote(self.rtt_ms), self.edge.set_rtt.remote(self.rtt_ms)])

    def generate(
        self,
        target_inputs: dict,
        drafter_inputs: dict,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | list[int] = 0,
        sampling: str = "rejection",
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        controlled_acceptance: ControlledAcceptance | None = None,
    ) -> GenerateOutput:
        """As ``CrossSpecEngine.generate`` (same arguments and checks). ``stats``: rounds,
        acceptance_rate, mean_accepted_length, tokens_per_round, first_round_drafts, ttft_ms, total_ms
        (timed at the edge), tokens_per_s, rtt_ms, fallback / fallback_reason (the drafter failed:
        an error or non-finite hidden states; the cloud decoded the rest alone, output unchanged),
        verify_ms (per round, in the cloud),
        request_bytes (the target inputs uploaded once), bytes (per direction, per round)."""
        models = SimpleNamespace(target=self.target, drafter=self.drafter, device=self.device)
        target_inputs, drafter_inputs = checks.check_inputs(models, target_inputs, drafter_inputs)
        batch = target_inputs["input_ids"].shape[0]
        max_new_tokens = checks.check_int("max_new_tokens", max_new_tokens, 1)
        checks.check_positions(self.target, target_inputs["input_ids"].shape[1], max_new_tokens)
        temperature = checks.check_temperature(temperature)
        sampling = checks.check_choice("sampling", sampling, SAMPLING_MODES)
        vocab = self.target.get_output_embeddings().weight.shape[0]
        eos = checks.eos_ids(self.target, eos_token_id, vocab)
        if controlled_acceptance is not None and not isinstance(controlled_acceptance, ControlledAcceptance):
            raise ValueError(
                f"{_OP}.generate: controlled_acceptance must be a ControlledAcceptance, "
                f"got {type(controlled_acceptance).__name__}"
            )
        if controlled_acceptance is not None and temperature != 0:
            raise ValueError(f"{_OP}.generate: controlled_acceptance needs greedy decoding (temperature=0)")
        settings = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seeds": checks.check_seeds(seed, batch),
            "sampling": sampling,
            "eos": eos.tolist(),
            "pad": checks.pad_id(self.target, eos, pad_token_id, vocab),
            # Room for the prompt's answer and the widest block past it (root + drafts).
            "room": max_new_tokens + max(self.free_token_budget, self.draft.gamma) + 2,
            "controlled": controlled_acceptance,
        }
        result = ray.get(self.edge.generate.remote(target_inputs, drafter_inputs, settings))
        stats = result["stats"]
        stats.update(ray.get(self.verifier.stats.remote()))
        stats["request_bytes"] = tensor_bytes(target_inputs)
        stats["device"] = str(self.device)
        return GenerateOutput(result["sequences"].to(self.device), stats)

    def close(self) -> None:
        """End both actors."""
        for actor in (self.edge, self.verifier):
            ray.kill(actor)
