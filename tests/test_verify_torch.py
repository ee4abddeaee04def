"""The ``torch`` backend of verify: token for token the reference, sync-free, traceable.

tests/test_verify.py runs the exact cases and bad inputs on every backend (this one included); here
the torch backend is compared with ``reference.verify`` on many random and hostile inputs, and its
two promises beyond the reference are checked: no device-to-host read, and torch.compile(fullgraph).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import crossspec_kernels as ck
from crossspec_kernels import reference
from crossspec_kernels.testing import assert_valid_output, make_case
from crossspec_kernels.torch_ops import verify as torch_verify

INF = float("inf")
NAN = float("nan")


def assert_same(a, b) -> None:
    for name, x, y in zip(a._fields, a, b, strict=True):
        assert torch.equal(x, y), f"{name} differs:\n{x}\n{y}"


def both(case: dict, **kwargs):
    """(torch backend, reference) on the same inputs."""
    expected = reference.verify(**case, **kwargs)
    return ck.verify(**case, **kwargs, backend="torch", validate_tree=False), expected


def mixed_temperature(batch: int) -> torch.Tensor:
    return torch.tensor([0.0, 0.7, 1.3, 0.0, 2.0])[torch.arange(batch) % 5]


# ----------------------------------------------------------------------------------------------
# Token for token the reference
# ----------------------------------------------------------------------------------------------

CASES = [
    # batch, nodes, vocab, tree, dtype
    (1, 5, 1000, False, torch.float32),
    (3, 7, 1000, True, torch.float16),
    (2, 0, 300, False, torch.float32),
    (2, 1, 300, True, torch.float32),
    (5, 9, 37, True, torch.float32),
    (2, 4, 4099, False, torch.bfloat16),  # > 2048: the chunked CPU argmax, with a padded last chunk
    (2, 6, 5000, True, torch.float32),  # chunks of 625
]
TEMPERATURES = {
    "greedy": 0.0,
    "sampled": 0.9,
    "mixed": mixed_temperature,  # per row, greedy and sampled rows in one batch
}


@pytest.mark.parametrize("batch,num_nodes,vocab,tree,dtype", CASES)
@pytest.mark.parametrize("temperature", list(TEMPERATURES), ids=list(TEMPERATURES))
@pytest.mark.parametrize("with_probs", [False, True], ids=["candidates", "draft_probs"])
def test_matches_reference(batch, num_nodes, vocab, tree, dtype, temperature, with_probs):
    value = TEMPERATURES[temperature]
    value = value(batch) if callable(value) else value
    case = make_case(batch, num_nodes, vocab, tree=tree, with_probs=with_probs, dtype=dtype, temperature=0.9)
    seed, offset = torch.arange(batch) * 7 - 3, torch.arange(batch) + 2**40
    out, expected = both(case, temperature=value, seed=seed, offset=offset)
    assert_same(out, expected)
    assert_valid_output(out, case["draft_tokens"], case["parents"], vocab)


def test_random_cases_match_reference():
    """Many small random trees, seeds and agreement rates: rare paths (deep walks, many siblings,
    every child rejected) only show up in numbers."""
    gen = torch.Generator().manual_seed(0)
    accepted = 0
    for trial in range(60):
        batch, num_nodes = (
            int(torch.randint(1, 5, (), generator=gen)),
            int(torch.randint(0, 12, (), generator=gen)),
        )
        case = make_case(
            batch,
            num_nodes,
            int(torch.randint(2, 60, (), generator=gen)),
            tree=trial % 2 == 0,
            with_probs=trial % 3 != 0,
            agree=float(torch.rand((), generator=gen)),
            seed=trial,
        )
        temperature = torch.rand(batch, generator=gen) * 2 * (torch.rand(batch, generator=gen) < 0.8)
        out, expected = both(case, temperature=temperature, seed=trial, offset=trial * 3)
        assert_same(out, expected)
        accepted += int(out.num_accepted.sum())
    assert accepted >= 50  # the comparisons went past the root


def test_padded_and_out_of_range_drafts():
    """-1 placeholders (ragged batches) and ids outside [0, V) are absent nodes, as in the reference."""
    for tree in (False, True):
        for with_probs in (False, True):
            case = make_case(4, 8, 50, tree=tree, with_probs=with_probs, agree=0.9)
            drafts = case["draft_tokens"]
            drafts[0, 5:] = -1  # a shorter row
            drafts[1, 2] = 50  # == V
            drafts[2, 0] = 10**9
            drafts[3, 3] = -7
            for temperature in (0.0, 1.0, mixed_temperature(4)):
                out, expected = both(case, temperature=temperature, seed=5)
                assert_same(out, expected)
                assert_valid_output(out, drafts, case["parents"], 50)


def test_malformed_parents_are_absent_nodes():
    """validate_tree=False: a node whose parent does not precede it is absent, on both sides."""
    case = make_case(3, 6, 40, tree=True, with_probs=True, agree=1.0)
    case["parents"] = torch.tensor([[-1, 0, 2, 1, -5, 3], [-1, -1, 0, 9, 3, 4], [0, 0, 1, 2, 3, 4]])
    for temperature in (0.0, 1.0):
        assert_same(*both(case, temperature=temperature, seed=1))


def test_nan_and_inf_logits():
    case = make_case(4, 5, 64, tree=True, with_probs=True, agree=0.8)
    logits = case["target_logits"]
    logits[0] = NAN  # all NaN
    logits[1, :, ::3] = NAN
    logits[2, :, 7] = INF
    logits[2, 1:, 9] = INF  # two +inf: equal weight on both
    logits[3] = -INF  # nothing finite: uniform
    for temperature in (0.0, 0.5, mixed_temperature(4)):
        for draft_probs in (None, case["draft_probs"]):
            out, expected = both(dict(case, draft_probs=draft_probs), temperature=temperature, seed=2)
            assert_same(out, expected)
            assert_valid_output(out, case["draft_tokens"], case["parents"], 64)


def test_bad_draft_probs():
    """NaN, negative, inf and zero q at the drafts (and elsewhere): never accepted on that basis."""
    case = make_case(4, 6, 30, tree=True, with_probs=True, agree=1.0)
    probs = case["draft_probs"]
    drafts, parent_slot = case["draft_tokens"], case["parents"] + 1
    for row, bad in enumerate((NAN, -0.3, INF, 0.0)):
        probs[row, parent_slot[:3], drafts[row, :3]] = bad  # the first three drafts' own q values
        probs[row, :, 20:] = bad  # and part of every row
    for temperature in (1.0, mixed_temperature(4)):
        for seed in range(3):
            out, expected = both(case, temperature=temperature, seed=seed)
            assert_same(out, expected)


def test_nonpositive_and_nonfinite_tensor_temperatures_are_greedy():
    """Without validation, temperature values that are not finite and > 0 mean greedy."""
    case = make_case(5, 4, 100, with_probs=True)
    temperature = torch.tensor([NAN, INF, -1.0, 0.0, 1.0])
    out, expected = both(case, temperature=temperature, seed=3)
    assert_same(out, expected)
    greedy = ck.verify(**case, backend="torch")
    for name, x, y in zip(out._fields, out, greedy, strict=True):
        assert torch.equal(x[:4], y[:4]), name


def test_philox_noise_matches_the_reference():
    seed = torch.tensor([0, -1, 2**63 - 1, -(2**63), 12345])
    offset = torch.tensor([0, -1, 2**32, 2**63 - 1, 7])
    rows, slots = torch.arange(5)[:, None], torch.arange(3)
    for vocab in (1, 10, 12):
        exponentials, accept_u = torch_verify.race_noise(seed, offset, 3, vocab, accept=True)
        uniforms = reference.vocab_uniforms(seed[:, None], offset[:, None], rows, slots, vocab)
        assert torch.equal(exponentials, -torch.log(uniforms))
        expected = reference.philox_uniform(
            seed[:, None], offset[:, None], rows, slots, reference.ACCEPT_COUNTER
        )
        assert torch.equal(accept_u, expected)
        without, none = torch_verify.race_noise(seed, offset, 3, vocab, accept=False)
        assert torch.equal(without, exponentials) and none is None


def test_softmax_weights_match_the_reference():
    z = torch.randn(6, 50) * 10
    z[1, 3] = INF
    z[2, [4, 9]] = INF
    z[3] = -INF
    z[4, ::2] = -INF
    z[5, 7] = -INF
    assert torch.equal(torch_verify.softmax_weights(z), reference.softmax_weights(z))


@pytest.mark.parametrize("length", [2047, 2048, 4099, 32064, 49152])
def test_chunked_argmax_is_torch_argmax(length):
    gen = torch.Generator().manual_seed(length)
    x = torch.randint(-3, 4, (6, length), generator=gen).float()  # many ties: lowest index must win
    x[1] = -INF
    x[2, -1] = INF  # in the last (maybe padded) chunk
    x[3, :] = 5.0
    x[4, length // 2 :] = 100.0  # ties across chunks
    assert torch.equal(torch_verify._argmax(x), x.argmax(dim=-1))


# ----------------------------------------------------------------------------------------------
# Preallocated outputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_out_buffers_are_reused(backend):
    buffers = reference.VerifyBuffers.empty(3, 5, "cpu")
    for round_index in range(3):
        case = make_case(3, 5, 200, tree=True, with_probs=True, seed=round_index)
        kwargs = dict(temperature=mixed_temperature(3), seed=round_index, offset=torch.tensor([0, 1, 2]))
        out = ck.verify(**case, **kwargs, backend=backend, out=buffers)
        assert out.tokens is buffers.tokens
        assert out.num_accepted is buffers.num_accepted
        assert out.path is buffers.path
        assert_same(out, reference.verify(**case, **kwargs))


# ----------------------------------------------------------------------------------------------
# No host syncs; torch.compile
# ----------------------------------------------------------------------------------------------

HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.is_nonzero.default,
}


class CountHostReads(TorchDispatchMode):
    """Counts ops that copy a tensor value to the host (what a host sync is made of on a GPU)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def count_host_reads(monkeypatch, fn) -> list[str]:
    counter = CountHostReads()
    original_tolist = torch.Tensor.tolist  # tolist reads without going through the dispatcher

    def tolist(self):
        counter.reads.append("tolist")
        return original_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with counter:
        fn()
    monkeypatch.setattr(torch.Tensor, "tolist", original_tolist)
    return counter.reads


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("with_probs", [False, True])
def test_no_host_reads(monkeypatch, tree, with_probs):
    case = make_case(3, 5, 100, tree=tree, with_probs=with_probs)
    kwargs = dict(
        temperature=mixed_temperature(3), seed=torch.tensor([1, 2, 3]), offset=torch.tensor([4, 5, 6])
    )
    buffers = reference.VerifyBuffers.empty(3, 5, "cpu")

    def call():
        ck.verify(**case, **kwargs, backend="torch", validate_tree=False)
        ck.verify(**case, **kwargs, backend="torch", validate_tree=False, out=buffers)
        ck.verify(**case, temperature=0.0, seed=1, backend="torch", validate_tree=False)

    assert count_host_reads(monkeypatch, call) == []
    # The counter sees reads where there are some: the reference walks with host-side loop tests.
    assert count_host_reads(monkeypatch, lambda: ck.verify(**case, **kwargs, backend="reference"))


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
@pytest.mark.parametrize("tree", [False, True])
def test_compiles_with_fullgraph(backend, tree):
    """backend="torch" is traced inline; the others go through the crossspec::verify custom op."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(logits, drafts, parents, probs, temperature, seed, offset, buffers):
        out = ck.verify(
            logits,
            drafts,
            parents,
            probs,
            temperature=temperature,
            seed=seed,
            offset=offset,
            backend=backend,
            validate_tree=False,
            out=buffers,
        )
        return out.tokens + 0, out.num_accepted + 0, out.path + 0

    buffers = reference.VerifyBuffers.empty(4, 6, "cpu")
    for round_index in range(2):
        case = make_case(4, 6, 300, tree=tree, with_probs=True, seed=round_index)
        args = (mixed_temperature(4), torch.tensor([9]), torch.arange(4) + round_index)
        expected = reference.verify(**case, temperature=args[0], seed=args[1], offset=args[2])
        got = step(*case.values(), *args, buffers)
        assert_same(type(expected)(*got), expected)
        assert_same(type(expected)(*buffers[:3]), expected)  # the out buffers were written


def test_custom_op_passes_opcheck():
    case = make_case(2, 4, 50, tree=True, with_probs=True)
    temperature, seed, offset = torch.tensor([0.0, 1.0]), torch.tensor([1, 2]), torch.tensor([3, 4])
    for backend in ("reference", "torch"):
        torch.library.opcheck(
            torch.ops.crossspec.verify.default, (*case.values(), temperature, seed, offset, backend)
        )
