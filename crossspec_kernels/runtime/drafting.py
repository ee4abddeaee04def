"""The drafter's side of a round: catch up on committed tokens, then propose a chain or a tree.

Drafts live in the target's vocabulary: the drafter's final hidden state goes through the adapter
and the target's LM head (``adapter_lm_head_topk``). Only ids the two vocabularies share (the
first ``shared_vocab`` rows of the LM head) are proposed, so every draft can be fed back to the
drafter; a committed target token outside the drafter's vocabulary is fed as ``unknown_token_id``
(it only affects the drafts' quality, never the output).

KV cache policy. A chain keeps its fed drafts in the drafter's cache; after verification each row
keeps the accepted ones (a chain's accepted drafts are already in place, so compaction is a crop)
and the rest become holes. A tree re-runs all expanded nodes of the round at every level, as one
block behind the committed prefix with the tree mask, and drops them afterwards: a level forward
is bound by reading the drafter's weights, so Q = top_k * level costs about what Q = top_k does,
and the committed prefix never holds a sibling that later queries could wrongly see. The accepted
path is then fed with the bonus token in the next round's first forward, which runs anyway.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from crossspec_kernels.ops.adapter_projection import TRITON_MAX_ROWS, adapter_lm_head_topk
from crossspec_kernels.runtime.draft_config import ChainDraft, TreeDraft
from crossspec_kernels.runtime.lane import Lane
from crossspec_kernels.runtime.stages import StageTimer


class Proposal(NamedTuple):
    """A round's drafts, in the layout ``verify`` takes."""

    tokens: torch.Tensor  # [B, N] target-vocabulary ids
    parents: torch.Tensor | None  # [B, N] parent node (-1 = root), None = a chain
    depth: torch.Tensor  # [B, N] node depth, 1 = a child of the root
    tree_mask: torch.Tensor  # [B, N, N] bool: node i sees node j (ancestor or itself)
    draft_probs: torch.Tensor | None  # [B, N + 1, V_target]: sampled chains only
    fed: int  # a chain's leading drafts already in the drafter cache (from slot fed_start on)
    fed_start: int
    timestamps: list  # per drafted level, StageTimer marks (prefill hiding counts free tokens)


class DraftModel:
    def __init__(
        self,
        drafter: torch.nn.Module,
        adapter: torch.nn.Module | None,
        lm_head_weight: torch.Tensor,
        timer: StageTimer,
        backend: str | None = None,
    ) -> None:
        self.lane = Lane(drafter, "drafter")
        self.backend = backend
        self.adapter = adapter
        drafter_vocab = drafter.get_input_embeddings().num_embeddings
        self.target_vocab = lm_head_weight.shape[0]
        self.shared_vocab = min(self.target_vocab, drafter_vocab)
        self.weight = lm_head_weight[: self.shared_vocab]
        self.drafter_vocab = drafter_vocab
        pad = getattr(drafter.config, "pad_token_id", None)
        self.unknown_token_id = pad if isinstance(pad, int) and 0 <= pad < drafter_vocab else 0
        self.timer = timer

    # ------------------------------------------------------------------------------------------
    def score(self, hidden: torch.Tensor, k: int, temperature: float = 1.0, probs: bool = False):
        """adapter + target LM head + top-k over [M, d] hidden states, in chunks the kernel takes."""
        parts = [
            adapter_lm_head_topk(
                chunk,
                self.adapter,
                self.weight,
                k,
                temperature=temperature,
                return_probs=probs,
                backend=self.backend,
            )
            for chunk in hidden.split(TRITON_MAX_ROWS)
        ]
        logprobs = torch.cat([part[0] for part in parts])
        ids = torch.cat([part[1] for part in parts])
        full = torch.cat([part[2] for part in parts]) if probs else None
        return logprobs, ids, full

    def _to_drafter_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.where((tokens >= 0) & (tokens < self.drafter_vocab), tokens, self.unknown_token_id)

    @staticmethod
    def _last_hidden(out) -> torch.Tensor:
        return out.hidden_states[-1][:, -1]

    # ------------------------------------------------------------------------------------------
    def prefill(self, inputs: dict) -> torch.Tensor:
        """The drafter's prompt; returns the final hidden state at its last position [B, d]."""
        with self.timer.stage("draft.prefill"):
            return self._last_hidden(self.lane.prefill(inputs, hidden=True))

    def catch_up(self, pending: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Feed committed tokens [B, P] (right-aligned; ``valid`` False = a hole before a row's
        tokens, None = all real); returns the hidden state at each row's last token [B, d]."""
        steps = torch.ones_like(pending) if valid is None else valid.long()
        positions = (self.lane.real_lengths()[:, None] + steps.cumsum(-1) - 1).clamp_min(0)
        with self.timer.stage("draft.step"):
            out = self.lane.extend(self._to_drafter_ids(pending), positions, valid=valid, hidden=True)
        return self._last_hidden(out)

    def chain(
        self,
        hidden: torch.Tensor,
        config: ChainDraft,
        *,
        temperature: float,
        generator: torch.Generator | None,
        should_stop=None,
        override=None,
    ) -> Proposal:
        """Draft up to ``config.gamma`` tokens; ``should_stop(timestamps)``, asked after each, ends early.
        ``override(token [B], step)`` may replace each proposal before it is fed back."""
        batch = hidden.shape[0]
        sampled = temperature > 0
        fed_start = self.lane.physical_length
        tokens, rows, timestamps = [], [], []
        for step in range(config.gamma):
            with self.timer.stage("draft.step"):
                _, ids, probs = self.score(hidden, 1, temperature if sampled else 1.0, probs=sampled)
                if sampled:
                    token = torch.multinomial(probs, 1, generator=generator)[:, 0]
                    rows.append(probs)
                else:
                    token = ids[:, 0]
                if override is not None:  # controlled acceptance (benchmarks): replaces the proposal
                    token = override(token, step)
                tokens.append(token)
                timestamps.append(self.timer.mark())
                if step + 1 == config.gamma or (should_stop is not None and should_stop(timestamps)):
                    break
                positions = self.lane.real_lengths()[:, None]
                hidden = self._last_hidden(self.lane.extend(token[:, None], positions, hidden=True))
        count = len(tokens)
        device = hidden.device
        draft_probs = None
        if sampled:
            rows.append(torch.zeros_like(rows[0]))  # the last node has no children
            draft_probs = F.pad(torch.stack(rows, 1), (0, self.target_vocab - self.shared_vocab))
        depth = torch.arange(1, count + 1, device=device).expand(batch, count)
        tree_mask = torch.ones(count, count, dtype=torch.bool, device=device).tril().expand(batch, -1, -1)
        return Proposal(
            torch.stack(tokens, 1), None, depth, tree_mask, draft_probs, count - 1, fed_start, timestamps
        )

    def tree(self, hidden: torch.Tensor, config: TreeDraft) -> Proposal:
        """An EAGLE-2-style dynamic tree (see TreeDraft); candidates are deterministic (top-k)."""
        k, batch, device = config.top_k, hidden.shape[0], hidden.device
        prefix_real = self.lane.real_lengths()  # the root sits at position prefix_real - 1
        prefix_slots = self.lane.physical_length
        capacity = k + (config.depth - 1) * k * k
        ancestors = torch.zeros(batch, capacity, capacity, dtype=torch.bool, device=device)

        with self.timer.stage("draft.step"):
            logprobs, tokens, _ = self.score(hidden, k)
        parents = torch.full_like(tokens, -1)
        depth = torch.ones_like(tokens)
        ancestors[:, torch.arange(k), torch.arange(k)] = True
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
                positions = prefix_real[:, None] - 1 + depth.gather(1, expanded)
                out = self.lane.extend(
                    tokens.gather(1, expanded), positions, tree_mask=block_mask, hidden=True
                )
                self.lane.truncate(prefix_slots)
                new_hidden = out.hidden_states[-1][:, -width:].reshape(batch * width, -1)
                child_logprobs, child_tokens, _ = self.score(new_hidden, k)
                child_parents = chosen.repeat_interleave(k, dim=1)  # [B, width * k]
                first = tokens.shape[1]
                new = torch.arange(first, first + width * k, device=device)
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
        best = torch.sort(logprobs, dim=-1, descending=True, stable=True).indices[:, :num_nodes]
        selected = best.sort(dim=-1).values  # candidate order is topological
        slot = torch.full_like(tokens, -1).scatter_(
            1, selected, torch.arange(num_nodes, device=device).expand(batch, -1)
        )
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
            prefix_slots,
            timestamps,
        )
