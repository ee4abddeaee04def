"""The drafter's side of a round: catch up on committed tokens, then propose a chain or a tree.

Drafts live in the target's vocabulary: the drafter's final hidden state goes through the adapter
and the target's LM head (``adapter_lm_head_topk``). Only ids the two vocabularies share (the
first ``shared_vocab`` rows of the LM head) are proposed, so every draft can be fed back to the
drafter; a committed target token outside the drafter's vocabulary is fed as ``unknown_token_id``
(it only affects the drafts' quality, never the output).

KV cache (a ``SlotCache``: every row has its own length, see ``kv_cache``). A chain feeds its
drafts one by one and commits each; after verification each row rolls back to the drafts it
had accepted, and the rest of the committed tokens (the bonus, and the last draft when all were
accepted) are fed in the next round's first forward, which runs anyway. A tree writes every level
as a scratch block behind the committed slots (all expanded nodes, tree-masked) and commits
nothing: a level forward is bound by reading the drafter's weights, so Q = top_k * level costs
about what Q = top_k does; the accepted path is fed with the bonus token next round.

No host reads: sampling draws on the device (exponential race), sizes come from the round's
host-side counts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from crossspec_kernels.models.adapters import BottleneckAdapter, LinearAdapter
from crossspec_kernels.ops.adapter_projection import TRITON_MAX_ROWS, adapter_lm_head_topk
from crossspec_kernels.runtime.draft_config import ChainDraft, TreeDraft
from crossspec_kernels.runtime.runner import ModelRunner
from crossspec_kernels.runtime.stages import StageTimer

FUSED_ADAPTERS = (BottleneckAdapter, LinearAdapter)


class Proposal(NamedTuple):
    """A round's drafts, in the layout ``verify`` takes."""

    tokens: torch.Tensor  # [B, N] target-vocabulary ids
    parents: torch.Tensor | None  # [B, N] parent node (-1 = root), None = a chain
    depth: torch.Tensor  # [B, N] node depth, 1 = a child of the root
    tree_mask: torch.Tensor  # [B, N, N] bool: node i sees node j (ancestor or itself)
    draft_probs: torch.Tensor | None  # [B, N + 1, V_target]: sampled chains only
    fed: int  # a chain's leading drafts committed to the drafter's cache
    timestamps: list  # per drafted level, StageTimer marks (prefill hiding counts free tokens)

    @staticmethod
    def empty(batch: int, device) -> Proposal:
        nothing = torch.empty(batch, 0, dtype=torch.int64, device=device)
        return Proposal(
            nothing, None, nothing, torch.empty(batch, 0, 0, dtype=torch.bool, device=device), None, 0, []
        )


class Pending(NamedTuple):
    """Committed tokens the drafter has not read yet: row b's first ``host_counts[b]`` of ``tokens``."""

    tokens: torch.Tensor  # [B, P]
    counts: torch.Tensor  # [B] device, 0 for rows that finished
    host_counts: list[int]
    features: torch.Tensor | None = None  # [B, P, d]: a feature head's input next to each token


class DraftModel:
    """The event drafter (any HF model behind an adapter) drafting in the target's vocabulary."""

    reads_sources = False  # a feature head's trees read the hidden state that scored each node

    def __init__(
        self,
        runner: ModelRunner,
        adapter: torch.nn.Module | None,
        lm_head_weight: torch.Tensor,
        timer: StageTimer,
        backend: str | None = None,
    ) -> None:
        self.runner = runner
        self.backend = backend
        # Our adapter kinds go to the op (fused on Triton); any other module maps hidden states first.
        self.module_adapter = None if adapter is None or isinstance(adapter, FUSED_ADAPTERS) else adapter
        self.adapter = None if self.module_adapter is not None else adapter
        drafter = runner.model
        drafter_vocab = drafter.get_input_embeddings().num_embeddings
        self.target_vocab = lm_head_weight.shape[0]
        self.shared_vocab = min(self.target_vocab, drafter_vocab)
        self.weight = lm_head_weight[: self.shared_vocab]
        self.drafter_vocab = drafter_vocab
        pad = getattr(drafter.config, "pad_token_id", None)
        self.unknown_token_id = pad if isinstance(pad, int) and 0 <= pad < drafter_vocab else 0
        self.timer = timer
        self.chain_base: torch.Tensor | None = None  # lengths before a chain's fed drafts

    @property
    def cache(self):
        return self.runner.cache

    # ------------------------------------------------------------------------------------------
    def score(self, hidden: torch.Tensor, k: int, temperature: float = 1.0, probs: bool = False):
        """adapter + target LM head + top-k over [M, d] hidden states, in chunks the kernel takes."""
        if self.module_adapter is not None:
            hidden = self.module_adapter(hidden)
        if hidden.shape[0] <= TRITON_MAX_ROWS:
            return self._score(hidden, k, temperature, probs)
        parts = [self._score(chunk, k, temperature, probs) for chunk in hidden.split(TRITON_MAX_ROWS)]
        full = torch.cat([part[2] for part in parts]) if probs else None
        return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]), full

    def _score(self, hidden, k, temperature, probs):
        return adapter_lm_head_topk(
            hidden,
            self.adapter,
            self.weight,
            k,
            temperature=temperature,
            return_probs=probs,
            backend=self.backend,
        )

    def _to_drafter_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.where((tokens >= 0) & (tokens < self.drafter_vocab), tokens, self.unknown_token_id)

    def _read(self, tokens, depth, tree_mask, sources) -> torch.Tensor:
        """One block forward over target-vocabulary ``tokens`` [B, W]: hidden states [B, W, d].

        ``sources`` [B, W, d]: the hidden state that scored each token (a feature head reads it
        next to the token; the drafter ignores it).
        """
        return self.runner.forward(self._to_drafter_ids(tokens), depth, tree_mask)

    def _read_level(self, tokens, offsets, block_mask, sources) -> torch.Tensor:
        """A tree level: every expanded node so far as one scratch block behind the committed
        slots (``offsets`` [B, W]: slots past the root, ``block_mask`` [B, W, W]: ancestors);
        nothing is committed. Hidden states [B, W, d]."""
        return self._read(tokens, offsets, block_mask, sources)

    def _feed(self, token, hidden, zero, ones) -> torch.Tensor:
        """A chain step: read draft ``token`` [B] (scored by ``hidden`` [B, d]) and commit it; the
        hidden state that scores the next draft [B, d]. ``zero`` [B, 1], ``ones`` [B]: int64."""
        hidden = self._read(token[:, None], zero, None, hidden[:, None])[:, 0]
        self.cache.advance(ones, [1] * token.shape[0])
        return hidden

    # ------------------------------------------------------------------------------------------
    def prefill(self, inputs: dict) -> torch.Tensor:
        """The drafter's prompt; returns the final hidden state at its last position [B, d].

        Raises (so that the engine falls back, whichever thread finishes first) when the drafter
        returns another batch size or non-finite hidden states (e.g. NaN weights): such a drafter
        would otherwise draft every round at no acceptance. One host read per request.
        """
        with self.timer.stage("draft.prefill"):
            hidden = self.runner.prefill(inputs)[:, -1]
        if hidden.dim() != 2 or hidden.shape[0] != self.cache.batch:
            raise ValueError(
                f"the drafter returned hidden states of shape {tuple(hidden.shape)} for a batch of "
                f"{self.cache.batch} rows"
            )
        if not bool(torch.isfinite(hidden).all()):
            raise FloatingPointError("the drafter's hidden states after its prompt are not finite (NaN/inf)")
        return hidden

    def reads(self, verdict):
        """What this model's turn reads of a round's ``round.Verdict`` (what crosses to its device):
        the tokens and the counts, not the target's hidden states or features."""
        return verdict._replace(hidden=None, features=None)

    def pending(self, verdict, active: torch.Tensor, active_host: list[bool], fed: int) -> Pending:
        """What the drafter must read after a round (``verdict``: ``round.Verdict``) that committed
        row b's ``verdict.tokens[b, :accepted[b] + 1]`` (``active`` [B]: rows still generating).

        A chain's first ``fed`` drafts are in the cache already; the accepted ones stay (the
        cache rolls back to them), so reading resumes after them.
        """
        tokens, num_accepted, accepted = verdict.tokens, verdict.num_accepted, verdict.accepted
        keep_host = [min(count, fed) for count in accepted]
        keep = num_accepted.clamp(max=fed)
        if fed:
            self.cache.set_lengths(
                self.chain_base + keep, [a + b for a, b in zip(self.chain_host, keep_host)]
            )
        host_counts = [
            count + 1 - kept if on else 0 for count, kept, on in zip(accepted, keep_host, active_host)
        ]
        width = max(max(host_counts), 1)
        column = torch.arange(width, device=tokens.device)
        source = (keep[:, None] + column).clamp(max=tokens.shape[1] - 1)
        counts = (num_accepted + 1 - keep) * active
        return Pending(tokens.gather(1, source), counts, host_counts)

    def catch_up(self, pending: Pending) -> torch.Tensor:
        """Read committed tokens; the hidden state at each row's last one [B, d]."""
        tokens, counts, host_counts = pending[:3]
        depth = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        with self.timer.stage("draft.step"):
            hidden = self._read(tokens, depth, None, pending.features)
            self.cache.advance(counts, host_counts)
            last = (counts - 1).clamp_min(0)
            return hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[2]))[:, 0]

    def chain(
        self,
        hidden: torch.Tensor,
        config: ChainDraft,
        *,
        temperature: float,
        sampler=None,
        position: torch.Tensor | None = None,
        should_stop=None,
        override=None,
    ) -> Proposal:
        """Draft up to ``config.gamma`` tokens; ``should_stop(timestamps)``, asked after each, ends early.
        ``override(token [B], step)`` may replace each proposal before it is fed back.

        Sampled (temperature > 0): ``sampler`` (``runtime.sampling``) draws draft ``step`` as token
        number ``position + step`` of each row ([B] tokens committed before the chain).
        """
        batch, device = hidden.shape[0], hidden.device
        sampled = temperature > 0
        self.chain_base, self.chain_host = self.cache.lengths.clone(), list(self.cache.host_lengths)
        ones, zero = (
            torch.ones(batch, dtype=torch.int64, device=device),
            torch.zeros(batch, 1, dtype=torch.int64, device=device),
        )
        tokens, rows, timestamps = [], [], []
        adaptive = config.min_confidence > 0
        confidence = torch.zeros(batch, device=device)  # cumulative draft log-probability
        for step in range(config.gamma):
            with self.timer.stage("draft.step"):
                logprobs, ids, probs = self.score(hidden, 1, temperature if sampled else 1.0, probs=sampled)
                if sampled:  # exponential race: argmax p(x) / E(x), E ~ Exp(1), drawn on the device
                    token = sampler.draw(probs, position + step)
                    if sampler.keeps_probs:
                        rows.append(probs)
                else:
                    token = ids[:, 0]
                if override is not None:  # controlled acceptance (benchmarks): replaces the proposal
                    token = override(token, step)
                tokens.append(token)
                timestamps.append(self.timer.mark())
                if step + 1 == config.gamma or (should_stop is not None and should_stop(timestamps)):
                    break
                if adaptive:
                    chosen = probs.gather(1, token[:, None])[:, 0].log() if sampled else logprobs[:, 0]
                    confidence = confidence + chosen
                    if not bool((confidence >= math.log(config.min_confidence)).any()):  # host read
                        break
                hidden = self._feed(token, hidden, zero, ones)
        count = len(tokens)
        draft_probs = None
        if rows:
            rows.append(torch.zeros_like(rows[0]))  # the last node has no children
            draft_probs = F.pad(torch.stack(rows, 1), (0, self.target_vocab - self.shared_vocab))
        depth = torch.arange(1, count + 1, device=device).expand(batch, count)
        tree_mask = torch.ones(count, count, dtype=torch.bool, device=device).tril().expand(batch, -1, -1)
        return Proposal(torch.stack(tokens, 1), None, depth, tree_mask, draft_probs, count - 1, timestamps)

    def tree(
        self, hidden: torch.Tensor, config: TreeDraft, *, noise=None, position: torch.Tensor | None = None
    ) -> Proposal:
        """An EAGLE-2-style dynamic tree (see TreeDraft). Candidates are each node's top-k; with
        ``noise`` (coupled sampling, ``sampling.CoupledNoise``) its Gumbel top-k at the node's
        position (``position`` [B]: tokens committed before the tree), whose first is the coupled
        draft. Nodes are kept by cumulative draft log-probability either way."""
        k, batch, device = config.top_k, hidden.shape[0], hidden.device

        def candidates(states: torch.Tensor, depth: torch.Tensor):  # [B * S, d], [B, S] parents' depth
            if noise is None:
                return self.score(states, k)[:2]
            probs = self.score(states, 1, noise.temperature, probs=True)[2]
            probs = probs.reshape(batch, depth.shape[1], -1)
            ids = noise.perturb(probs, position[:, None] + depth).topk(k, dim=-1).indices
            return probs.gather(2, ids).log().reshape(-1, k), ids.reshape(-1, k)

        capacity = k + (config.depth - 1) * k * k
        ancestors = torch.zeros(batch, capacity, capacity, dtype=torch.bool, device=device)
        diagonal = torch.arange(capacity, device=device)

        with self.timer.stage("draft.step"):
            logprobs, tokens = candidates(hidden, torch.zeros(batch, 1, dtype=torch.int64, device=device))
        # The hidden state that scored each candidate (what a feature head reads when expanding it).
        sources = hidden[:, None].expand(-1, k, -1) if self.reads_sources else None
        parents = torch.full_like(tokens, -1)
        depth = torch.ones_like(tokens)
        ancestors[:, diagonal[:k], diagonal[:k]] = True
        level_start, level_size = 0, k
        expanded = torch.empty(batch, 0, dtype=torch.int64, device=device)
        timestamps = [self.timer.mark()]
        for _ in range(config.depth - 1):
            with self.timer.stage("draft.step"):
                width = min(k, level_size)
                level = logprobs[:, level_start : level_start + level_size]
                chosen = level.topk(width, dim=-1).indices + level_start  # [B, width]
                expanded = torch.cat([expanded, chosen], 1)
                count = expanded.shape[1]
                rows = ancestors.gather(1, expanded[:, :, None].expand(-1, -1, capacity))
                block_mask = rows.gather(2, expanded[:, None, :].expand(-1, count, -1))
                # The root is the last committed slot: a node of depth d sits d - 1 slots past it.
                expanded_sources = None
                if sources is not None:
                    expanded_sources = sources.gather(
                        1, expanded[:, :, None].expand(-1, -1, sources.shape[2])
                    )
                out = self._read_level(
                    tokens.gather(1, expanded), depth.gather(1, expanded) - 1, block_mask, expanded_sources
                )
                new_hidden = out[:, -width:].reshape(batch * width, -1)
                child_logprobs, child_tokens = candidates(new_hidden, depth.gather(1, chosen))
                if sources is not None:
                    children = new_hidden.reshape(batch, width, 1, -1).expand(-1, -1, k, -1)
                    sources = torch.cat([sources, children.reshape(batch, width * k, -1)], 1)
                child_parents = chosen.repeat_interleave(k, dim=1)  # [B, width * k]
                first = tokens.shape[1]
                new = diagonal[first : first + width * k]
                ancestors[:, new] = ancestors.gather(1, child_parents[:, :, None].expand(-1, -1, capacity))
                ancestors[:, new, new] = True
                logprobs = torch.cat(
                    [logprobs, logprobs.gather(1, child_parents) + child_logprobs.reshape(batch, -1)], 1
                )
                tokens = torch.cat([tokens, child_tokens.reshape(batch, -1)], 1)
                parents = torch.cat([parents, child_parents], 1)
                depth = torch.cat([depth, depth.gather(1, child_parents) + 1], 1)
                level_start, level_size = first, width * k
                timestamps.append(self.timer.mark())

        # The best max_nodes candidates. A child's cumulative log-prob never exceeds its parent's and
        # a parent has the lower index, so a stable sort keeps every selected node's ancestors.
        num_nodes = min(config.max_nodes, tokens.shape[1])
        if config.min_confidence > 0:
            confident = (logprobs >= math.log(config.min_confidence)).sum(-1).max()
            num_nodes = max(1, min(num_nodes, int(confident)))  # host read
        best = torch.sort(logprobs, dim=-1, descending=True, stable=True).indices[:, :num_nodes]
        selected = best.sort(dim=-1).values  # candidate order is topological
        slot = torch.full_like(tokens, -1).scatter_(1, selected, diagonal[:num_nodes].expand(batch, -1))
        parent_candidates = parents.gather(1, selected)
        node_parents = torch.where(parent_candidates < 0, -1, slot.gather(1, parent_candidates.clamp_min(0)))
        used = ancestors[:, : tokens.shape[1], : tokens.shape[1]]
        rows = used.gather(1, selected[:, :, None].expand(-1, -1, used.shape[2]))
        tree_mask = rows.gather(2, selected[:, None, :].expand(-1, num_nodes, -1))
        return Proposal(
            tokens.gather(1, selected),
            node_parents,
            depth.gather(1, selected),
            tree_mask,
            None,
            0,
            timestamps,
        )
