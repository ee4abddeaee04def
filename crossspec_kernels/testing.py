"""Input builders and invariant checks for verify, shared by the tests and the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from crossspec_kernels import reference


def random_parents(num_nodes: int, generator: torch.Generator) -> torch.Tensor:
    """A random valid tree: node i hangs under a uniformly chosen earlier node or the root."""
    return torch.tensor(
        [int(torch.randint(-1, i, (), generator=generator)) if i else -1 for i in range(num_nodes)],
        dtype=torch.int64,
    )


def make_case(
    batch: int,
    num_nodes: int,
    vocab: int,
    *,
    tree: bool = False,
    with_probs: bool = False,
    dtype: torch.dtype = torch.float32,
    temperature: float = 1.0,
    agree: float = 0.7,
    seed: int = 0,
) -> dict:
    """Inputs where drafts are often right, so walks go deep and every code path is exercised.

    Each draft token is, with probability ``agree``, the target's choice at its parent (its argmax,
    or a sample from q when ``with_probs``), else a uniformly random token.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_nodes + 1, vocab, generator=gen) * 3
    parents = random_parents(num_nodes, gen) if tree else reference.chain_parents(num_nodes)
    parent_slot = parents + 1
    probs = None
    if with_probs:
        q_logits = logits + torch.randn(logits.shape, generator=gen)
        probs = torch.softmax(q_logits / max(temperature, 1e-3), dim=-1)
        proposal = torch.multinomial(probs[:, parent_slot].reshape(-1, vocab), 1, generator=gen)
        proposal = proposal.reshape(batch, num_nodes)
    else:
        proposal = logits[:, parent_slot].argmax(-1)
    noise = torch.randint(0, vocab, (batch, num_nodes), generator=gen)
    keep = torch.rand(batch, num_nodes, generator=gen) < agree
    draft_tokens = torch.where(keep, proposal, noise)
    return dict(
        target_logits=logits.to(dtype),
        draft_tokens=draft_tokens,
        parents=parents,
        draft_probs=None if probs is None else probs.to(dtype),
    )


def assert_valid_output(out, draft_tokens, parents, vocab) -> None:
    """Contract invariants that hold for any backend, any inputs and any randomness."""
    batch, num_nodes = draft_tokens.shape
    assert out.tokens.shape == (batch, num_nodes + 1) and out.tokens.dtype == torch.int64
    assert out.path.shape == (batch, num_nodes) and out.path.dtype == torch.int64
    assert out.num_accepted.shape == (batch,) and out.num_accepted.dtype == torch.int64
    if parents is None:
        parents = reference.chain_parents(num_nodes)
    parents = parents.expand(batch, num_nodes)
    for b in range(batch):
        k = int(out.num_accepted[b])
        assert 0 <= k <= num_nodes
        path = out.path[b, :k].tolist()
        assert out.path[b, k:].eq(-1).all(), "path must be -1 after the accepted nodes"
        assert out.tokens[b, k + 1 :].eq(-1).all(), "tokens must be -1 after the bonus token"
        assert 0 <= int(out.tokens[b, k]) < vocab, "the correction/bonus token must be in the vocabulary"
        previous = -1
        for i, node in enumerate(path):
            assert int(parents[b, node]) == previous, f"row {b}: path {path} is not a root path"
            assert int(out.tokens[b, i]) == int(draft_tokens[b, node])
            assert 0 <= int(draft_tokens[b, node]) < vocab
            previous = node


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[Q, Q] bool: node i sees node j iff j is i or one of its ancestors (parents [Q], -1 = none).

    A verification step's mask over (root, draft nodes) is ancestor_mask of [-1, parents + 1].
    """
    num_nodes = parents.shape[0]
    mask = torch.eye(num_nodes, dtype=torch.bool)
    for i, parent in enumerate(parents.tolist()):
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask


def compile_offline(script: str, capability: int, timeout: int = 900) -> str:
    """Run ``script`` (which lowers Triton kernels with triton.compile for sm_<capability>) in a
    subprocess with TRITON_INTERPRET off, assert it succeeded and printed "compiled for sm_<cc>",
    and return its stdout.

    The CPU interpreter accepts code the real compiler rejects, so every kernel is also lowered to a
    cubin here, on a machine without a GPU.
    """
    result = subprocess.run(
        [sys.executable, "-c", script, str(capability)],
        env=dict(os.environ, TRITON_INTERPRET="0"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"compiled for sm_{capability}" in result.stdout, result.stdout[-2000:]
    return result.stdout
