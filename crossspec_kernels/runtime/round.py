"""The speculative round: one target forward over [root + drafts], accept, commit.

``Verifier.step`` is the whole round, on one screen, in the spirit of gpt-fast's
``speculative_decode``; everything else (stage timing, streams, prefill hiding, fallback,
statistics, the drafter's turn) wraps it in ``engine.py``.

Host reads: exactly one per round, the accepted counts, each row's first end-of-sequence
position and whether the drafter's hidden states were finite ([3, B] ints). They size the next forwards and decide when to stop; nothing else in a
round reads a device value. Per-round buffers (verify's outputs, per-row temperature, seed and
offset) live on the device and are reused.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from crossspec_kernels.ops.compact_kv import compact_kv
from crossspec_kernels.ops.verify import verify
from crossspec_kernels.reference import VerifyBuffers
from crossspec_kernels.runtime.drafting import Proposal
from crossspec_kernels.runtime.runner import ModelRunner
from crossspec_kernels.runtime.sampling import CoupledNoise


class Verdict(NamedTuple):
    """What one round decided, per row."""

    tokens: torch.Tensor  # [B, N+1]: accepted drafts, then the correction/bonus token (-1 after)
    num_accepted: torch.Tensor  # [B] device
    accepted: list[int]  # host copy of num_accepted
    eos_at: list[int]  # index in tokens of the first end-of-sequence token, -1 if none
    hidden: torch.Tensor | None  # [B, W, d] the target's final hidden states of the block
    # [B, N+1, d] with Verifier.keep_features: the target's features (final hidden states) of the
    # root, then of the accepted nodes in order; the inputs of a feature head next to ``tokens``.
    features: torch.Tensor | None = None
    drafter_finite: bool = True  # the ``finite`` flag step() was given, read with the counts


class Verifier:
    """The target's side of generation: prefill, then one ``step`` per round.

    Args:
        runner: the target's ModelRunner (its SlotCache allocated).
        lm_head: the target's output embedding module.
        eos: [E] int64 end-of-sequence ids on the device.
        temperature, seeds: the request's sampling settings (0 = greedy; one seed per row).
        backend: verify / compact_kv backend (None: each op chooses).
        sampling: "rejection" or "coupled" (``runtime.sampling``; sampled requests only).
    """

    def __init__(
        self,
        runner: ModelRunner,
        lm_head,
        eos: torch.Tensor,
        temperature: float,
        seeds: list[int],
        backend,
        sampling: str = "rejection",
    ):
        self.runner, self.lm_head, self.eos, self.backend = runner, lm_head, eos, backend
        self._compact_backend = "triton" if backend == "cuda" else backend  # no C++ compact_kv
        batch, device = runner.cache.batch, runner.cache.device
        # Greedy requests pass a Python 0 (verify then skips the sampling noise it cannot know is unused).
        self.temperature = (
            0.0 if temperature == 0 else torch.full((batch,), temperature, dtype=torch.float32, device=device)
        )
        self.seed = torch.tensor(seeds, dtype=torch.int64, device=device)
        # Coupled: verification is greedy on scores perturbed by the position-keyed race noise.
        self.noise = None
        if temperature > 0 and sampling == "coupled":
            self.noise, self.temperature = CoupledNoise(self.seed, temperature), 0.0
        # Tokens each row has committed (uncapped): the position the root's logits predict, which
        # keys the sampling noise, so padding and batch width do not change a row's stream.
        self.generated = torch.zeros(batch, dtype=torch.int64, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)  # rows still generating
        self.active_host = [True] * batch
        self.root_logits: torch.Tensor | None = None
        self.keep_features = False  # a feature head drafts: keep the target's features (Verdict)
        self.prompt_hidden: torch.Tensor | None = None  # [B, T, d] the prompt's, with keep_features
        self._root_feature: torch.Tensor | None = None
        self._outputs: dict[int, VerifyBuffers] = {}  # verify's outputs per node count, reused

    @property
    def cache(self):
        return self.runner.cache

    def prefill(self, inputs: dict) -> torch.Tensor:
        """The prompt; keeps the logits at its last token (the first round's root) and returns them."""
        hidden = self.runner.prefill(inputs)
        self.root_logits = self.lm_head(hidden[:, -1:])[:, 0]
        if self.keep_features:
            self.prompt_hidden, self._root_feature = hidden, hidden[:, -1]
        return self.root_logits

    def step(
        self, root: torch.Tensor | None, proposal: Proposal, finite: torch.Tensor | None = None
    ) -> Verdict:
        """Verify ``proposal`` after ``root`` [B] (None: the root is the prompt's last token, in the
        cache already, and its logits are the prefill's); commit the accepted path and the bonus.
        ``finite``: a device bool the drafter computed (its hidden states were finite), read in the
        round's one host read rather than in a read of its own."""
        cache = self.cache
        block, depth, tree, tree_start = self._block(root, proposal)
        hidden, logits = self.forward(block, depth, tree, first=root is None)
        result = self.accept(logits, proposal)
        if proposal.parents is not None and proposal.tokens.shape[1] > 0:
            self.compact(result, tree_start)
        committed = torch.arange(result.tokens.shape[1], device=block.device) <= result.num_accepted[:, None]
        is_eos = committed & torch.isin(result.tokens, self.eos)
        first_eos = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), -1)
        flag = torch.ones_like(first_eos) if finite is None else finite.expand_as(first_eos).long()
        accepted, eos_at, ok = torch.stack([result.num_accepted, first_eos, flag]).tolist()  # one read
        self.generated = self.generated + result.num_accepted + 1
        starts = [length - (root is None) for length in cache.host_lengths]
        cache.set_lengths(
            torch.where(self.active, tree_start + 1 + result.num_accepted, cache.lengths),
            [
                s + 1 + a if on else n
                for s, a, on, n in zip(starts, accepted, self.active_host, cache.host_lengths)
            ],
        )
        features = self._features(hidden, result.path, root is None) if self.keep_features else None
        return Verdict(result.tokens, result.num_accepted, accepted, eos_at, hidden, features, bool(ok[0]))

    # the round's three parts (the engine wraps each in a timed stage) -------------------------
    def forward(self, block, depth, tree, *, first: bool):
        """The target over the block: (hidden [B, W, d] or None, logits [B, N+1, V])."""
        hidden = logits = None
        if block.shape[1] > 0:
            # The first round's block size depends on timing (free tokens): eager, never compiled.
            hidden = self.runner.forward(block, depth, tree, eager=first)
            logits = self.lm_head(hidden)
        if first:  # the root's logits are the prefill's
            logits = torch.cat([self.root_logits[:, None]] + ([] if logits is None else [logits]), 1)
        return hidden, logits

    def accept(self, logits: torch.Tensor, proposal: Proposal):
        """verify into this round's reused buffers (valid until the next round with as many nodes)."""
        batch, nodes = proposal.tokens.shape
        out = self._outputs.get(nodes)
        if out is None:
            out = self._outputs[nodes] = VerifyBuffers.empty(batch, nodes, logits.device)
        if self.noise is not None:  # slot s predicts token number generated + depth(s)
            depth = torch.cat([torch.zeros_like(self.generated)[:, None], proposal.depth], 1)
            logits = self.noise.target_scores(logits, self.generated[:, None] + depth)
        return verify(
            logits,
            proposal.tokens,
            proposal.parents,
            proposal.draft_probs,
            temperature=self.temperature,
            seed=self.seed,
            offset=self.generated,  # new every round
            validate_tree=False,
            backend=self.backend,
            out=out,
        )

    def compact(self, result, tree_start: torch.Tensor) -> None:
        """Move an accepted tree path next to the root, in every layer."""
        if self._compact_backend is None and self.cache.device.type == "cpu":
            self.cache.compact(result.path, result.num_accepted, tree_start)  # the op checks values on CPU
        else:
            compact_kv(
                self.cache.tensors(),
                result.path,
                result.num_accepted,
                tree_start,
                backend=self._compact_backend,
            )

    def _features(self, hidden, path: torch.Tensor, first: bool) -> torch.Tensor:
        """[B, N+1, d]: the root's feature (the prefill's last, or the block's first), then the
        accepted nodes' (``path``; a chain's path is its node order, -1 past the accepted)."""
        root = self._root_feature if first else hidden[:, 0]
        if path.shape[1] == 0:
            return root[:, None]
        nodes = hidden if first else hidden[:, 1:]
        index = path.clamp_min(0)[:, :, None].expand(-1, -1, nodes.shape[2])
        return torch.cat([root[:, None], nodes.gather(1, index)], 1)

    def finish(self, row: int) -> None:
        """Row ``row`` is done: its cache stops growing (later rounds still compute it, unread)."""
        self.active_host[row] = False
        self.active[row] = False

    def _block(self, root, proposal: Proposal):
        """(tokens [B, W], depth [B, W] past the committed slots, tree [B, W, W] or None, root slot [B])."""
        lengths = self.cache.lengths
        chain = proposal.parents is None
        if root is None:  # the root is the last committed slot
            tree = None if chain else proposal.tree_mask
            return proposal.tokens, proposal.depth - 1, tree, lengths - 1
        batch, nodes = proposal.tokens.shape
        zero = torch.zeros(batch, 1, dtype=torch.int64, device=lengths.device)
        tree = None
        if not chain:
            tree = torch.zeros(batch, nodes + 1, nodes + 1, dtype=torch.bool, device=lengths.device)
            tree[:, :, 0] = True
            tree[:, 1:, 1:] = proposal.tree_mask
        return (
            torch.cat([root[:, None], proposal.tokens], 1),
            torch.cat([zero, proposal.depth], 1),
            tree,
            lengths,
        )
