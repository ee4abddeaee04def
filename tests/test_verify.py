"""crossspec_kernels.verify: backends against the reference, exact cases, robustness, bad inputs."""

from __future__ import annotations

import pytest
import torch

import crossspec_kernels as ck
from crossspec_kernels import reference
from crossspec_kernels.testing import assert_valid_output, make_case

INF = float("inf")


def run(case: dict, backend: str, device: str = "cpu", **kwargs):
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    return ck.verify(**moved, backend=backend, **kwargs)


def assert_same(a, b) -> None:
    for name, x, y in zip(a._fields, a, b, strict=True):
        assert torch.equal(x.cpu(), y.cpu()), f"{name} differs:\n{x}\n{y}"


# ----------------------------------------------------------------------------------------------
# Backends agree token for token with the reference (same inputs, same seed)
# ----------------------------------------------------------------------------------------------

CASES = [
    # batch, nodes, vocab, tree, dtype
    (3, 5, 1000, False, torch.float32),
    (2, 7, 1000, True, torch.float16),
    (1, 0, 1000, False, torch.float32),
    (2, 3, 32064, False, torch.float32),
    (4, 9, 37, True, torch.float32),
]
MODES = [("greedy", 0.0, False), ("sampled", 0.8, False), ("rejection", 1.0, True)]


@pytest.mark.parametrize("batch,num_nodes,vocab,tree,dtype", CASES)
@pytest.mark.parametrize("mode,temperature,with_probs", MODES, ids=[m[0] for m in MODES])
def test_triton_matches_reference(batch, num_nodes, vocab, tree, dtype, mode, temperature, with_probs):
    case = make_case(
        batch, num_nodes, vocab, tree=tree, with_probs=with_probs, dtype=dtype, temperature=temperature
    )
    expected = run(case, "reference", temperature=temperature, seed=11, offset=5)
    assert_valid_output(expected, case["draft_tokens"], case["parents"], vocab)
    assert_same(run(case, "triton", temperature=temperature, seed=11, offset=5), expected)


def test_cases_exercise_acceptance():
    """The shared cases must actually accept drafts, or the comparisons above prove little."""
    accepted = 0
    for batch, num_nodes, vocab, tree, _dtype in CASES:
        for _, temperature, with_probs in MODES:
            case = make_case(
                batch, num_nodes, vocab, tree=tree, with_probs=with_probs, temperature=temperature
            )
            accepted += int(run(case, "reference", temperature=temperature, seed=11).num_accepted.sum())
    assert accepted >= 20


def test_triton_per_row_temperature_and_seeds():
    case = make_case(4, 6, 500, tree=True, with_probs=True)
    kwargs = dict(
        temperature=torch.tensor([0.0, 0.5, 1.0, 2.0]),
        seed=torch.tensor([1, 2, -3, 2**62]),
        offset=torch.tensor([0, 7, 2**40, -1]),
    )
    assert_same(run(case, "triton", **kwargs), run(case, "reference", **kwargs))


def test_triton_strided_inputs():
    case = make_case(3, 4, 300, with_probs=True)
    # Non-contiguous batch/slot strides, unit vocabulary stride: what a slice of a bigger buffer gives.
    big_logits = torch.randn(3, 9, 300)
    big_logits[:, ::2] = case["target_logits"]
    big_probs = torch.rand(6, 5, 300)
    big_probs[::2] = case["draft_probs"]
    strided = dict(case, target_logits=big_logits[:, ::2], draft_probs=big_probs[::2])
    assert not strided["target_logits"].is_contiguous()
    expected = run(case, "reference", temperature=1.0, seed=4)
    assert_same(run(strided, "triton", temperature=1.0, seed=4), expected)
    assert_same(run(strided, "reference", temperature=1.0, seed=4), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,temperature,with_probs", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize(
    "batch,num_nodes,vocab,tree",
    [(1, 5, 32064, False), (8, 8, 32064, True), (64, 4, 1000, False), (3, 63, 1001, True)],
)
def test_gpu_backend_matches_reference(
    backend, dtype, mode, temperature, with_probs, batch, num_nodes, vocab, tree
):
    case = make_case(
        batch, num_nodes, vocab, tree=tree, with_probs=with_probs, dtype=dtype, temperature=temperature
    )
    expected = run(case, "reference", "cuda", temperature=temperature, seed=11, offset=3)
    assert_same(run(case, backend, "cuda", temperature=temperature, seed=11, offset=3), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_is_graph_capturable(backend):
    case = {
        k: (v.cuda() if isinstance(v, torch.Tensor) else v)
        for k, v in make_case(8, 6, 32064, with_probs=True).items()
    }
    seed = torch.tensor([5], device="cuda")
    offset = torch.zeros(1, dtype=torch.int64, device="cuda")
    temperature = torch.full((8,), 0.9, device="cuda")
    kwargs = dict(temperature=temperature, seed=seed, offset=offset, backend=backend, validate_tree=False)
    ck.verify(**case, **kwargs)  # warm up: compile and allocate outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ck.verify(**case, **kwargs)
    for step in range(3):
        offset.fill_(step)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(captured, ck.verify(**case, **dict(kwargs, backend="reference")))


# ----------------------------------------------------------------------------------------------
# Exact cases (every backend that runs here)
# ----------------------------------------------------------------------------------------------

BACKENDS = ["reference", "torch", "triton"]


def one_hot_logits(batch, winners, vocab):
    """Logits whose argmax (and, at any temperature <= 1, almost all probability) is winners[b][s]."""
    logits = torch.zeros(batch, len(winners[0]), vocab)
    for b, row in enumerate(winners):
        for s, w in enumerate(row):
            logits[b, s, w] = 60.0
    return logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_chain_exact(backend):
    # Target argmax per slot: 3, 5, 7, 9. Row 0 drafts all right, row 1 breaks at node 1,
    # row 2 breaks at node 0.
    logits = one_hot_logits(3, [[3, 5, 7, 9]] * 3, 12)
    drafts = torch.tensor([[3, 5, 7], [3, 4, 7], [0, 5, 7]])
    out = ck.verify(logits, drafts, backend=backend)
    assert out.tokens.tolist() == [[3, 5, 7, 9], [3, 5, -1, -1], [3, -1, -1, -1]]
    assert out.num_accepted.tolist() == [3, 1, 0]
    assert out.path.tolist() == [[0, 1, 2], [0, -1, -1], [-1, -1, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_tree_exact(backend):
    #        root
    #      /  |   \
    #   n0:4 n1:2 n2:4     (n2 duplicates n0's token: the lower index wins)
    #    |         |
    #   n3:6      n4:1
    #    |
    #   n5:8
    parents = torch.tensor([-1, -1, -1, 0, 2, 3])
    drafts = torch.tensor([[4, 2, 4, 6, 1, 8]])
    # argmax per slot (root, n0..n5)
    logits = one_hot_logits(1, [[4, 6, 0, 1, 8, 0, 3]], 10)
    out = ck.verify(logits, drafts, parents, backend=backend)
    assert out.tokens.tolist() == [[4, 6, 8, 3, -1, -1, -1]]
    assert out.path.tolist() == [[0, 3, 5, -1, -1, -1]]
    assert out.num_accepted.tolist() == [3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_probs", [False, True])
def test_one_hot_target(backend, with_probs):
    """p is one-hot: a draft equal to the winner is always accepted, anything else never is."""
    logits = one_hot_logits(2, [[2, 3, 4, 5]] * 2, 9)
    logits[:, :, :] = torch.where(logits > 0, 0.0, -INF)  # exactly one finite logit per row
    drafts = torch.tensor([[2, 3, 4], [2, 8, 4]])
    probs = torch.full((2, 4, 9), 1 / 9) if with_probs else None
    for seed in range(5):
        out = ck.verify(logits, drafts, None, probs, temperature=1.0, seed=seed, backend=backend)
        assert out.tokens.tolist() == [[2, 3, 4, 5], [2, 3, -1, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_equals_q_accepts_everything(backend):
    case = make_case(6, 5, 200, with_probs=True, agree=1.0, temperature=0.7)
    # q := p exactly as the kernels compute it, so acceptance min(1, p/q) is 1 for every draft.
    weights = reference.softmax_weights(reference.sanitize_logits(case["target_logits"]) / 0.7)
    case["draft_probs"] = weights / weights.sum(-1, keepdim=True)
    out = run(case, backend, temperature=0.7, seed=3)
    assert out.num_accepted.tolist() == [5] * 6
    assert_valid_output(out, case["draft_tokens"], case["parents"], 200)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_supports_reject_first(backend):
    vocab = 16
    logits = torch.full((4, 3, vocab), -INF)
    logits[..., 8:] = torch.randn(4, 3, 8)  # p lives on 8..15
    probs = torch.zeros(4, 3, vocab)
    probs[..., :8] = 1 / 8  # q lives on 0..7
    drafts = torch.randint(0, 8, (4, 2))
    out = ck.verify(logits, drafts, None, probs, temperature=1.0, seed=9, backend=backend)
    assert out.num_accepted.tolist() == [0] * 4
    assert ((out.tokens[:, 0] >= 8) & (out.tokens[:, 0] < vocab)).all()
    assert out.tokens[:, 1:].eq(-1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_p_is_never_accepted(backend):
    logits = torch.zeros(1, 2, 6)
    logits[0, 0, 3] = -INF  # p(3) = 0
    probs = torch.full((1, 2, 6), 1 / 6)
    for seed in range(10):
        out = ck.verify(logits, torch.tensor([[3]]), None, probs, temperature=1.0, seed=seed, backend=backend)
        assert out.num_accepted.tolist() == [0]
        assert out.tokens[0, 0] != 3  # the residual (p - q)+ puts no mass on a token p excludes


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_without_a_positive_finite_q_is_never_accepted(backend):
    """A child whose q(x) is 0, NaN, negative or inf could not have been drawn from q: it is never
    accepted and leaves the residual as it is, so the emitted token still follows p."""
    vocab = 6
    logits = torch.zeros(5, 2, vocab)
    logits[:4, 0, 3] = -30.0  # the draft is a token the target almost never picks
    logits[4, 0, 0] = 30.0  # control row: a draft the target always picks, with a valid q
    probs = torch.full((5, 2, vocab), 0.25)
    probs[:, :, 5] = 0.0
    probs[:, 0, 3] = torch.tensor([0.0, float("nan"), -0.5, INF, 0.25])
    drafts = torch.tensor([[3], [3], [3], [3], [0]])
    emitted = set()
    for seed in range(20):
        out = ck.verify(logits, drafts, None, probs, temperature=1.0, seed=seed, backend=backend)
        assert out.num_accepted.tolist() == [0, 0, 0, 0, 1]
        assert not out.tokens[:4, 0].eq(3).any()
        emitted |= set(out.tokens[:4, 0].tolist())
    # A residual updated with the bad q would leave only token 5 (and 3 for the negative q).
    assert emitted - {3, 5}


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_drafts(backend):
    logits = torch.randn(3, 1, 50)
    no_drafts = torch.empty(3, 0, dtype=torch.int64)
    for temperature in (0.0, 1.0):
        out = ck.verify(logits, no_drafts, temperature=temperature, backend=backend)
        assert out.tokens.shape == (3, 1) and out.path.shape == (3, 0)
        assert out.num_accepted.tolist() == [0, 0, 0]
        assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < 50
    greedy = ck.verify(logits, no_drafts, backend=backend)
    assert greedy.tokens[:, 0].tolist() == logits[:, 0].argmax(-1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_absent_nodes_and_descendants_never_accepted(backend, temperature):
    # Chain 0 -> 1 -> 2; the target agrees with all of them, but node 1 is a -1 placeholder
    # (row 0) or an id past the vocabulary (row 1): only node 0 can be accepted.
    logits = one_hot_logits(2, [[1, 2, 3, 4]] * 2, 6)
    drafts = torch.tensor([[1, -1, 3], [1, 6, 3]])
    out = ck.verify(logits, drafts, temperature=temperature, seed=1, backend=backend)
    assert out.num_accepted.tolist() == [1, 1]
    assert out.tokens[:, :2].tolist() == [[1, 2], [1, 2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_logits_stay_in_range(backend):
    vocab = 40
    logits = torch.randn(4, 4, vocab)
    logits[0] = float("nan")  # all NaN
    logits[1, :, ::3] = float("nan")
    logits[2, :, 7] = INF  # one +inf: it is the only possible outcome
    logits[2, :, 9] = -INF
    logits[3] = -INF  # nothing finite: uniform
    drafts = torch.tensor([[0, 1, 2], [5, 5, 5], [7, 7, 7], [1, 2, 3]])
    probs = torch.softmax(torch.randn(4, 4, vocab), -1)
    probs[0, 0, 0] = float("nan")
    for temperature in (0.0, 0.5, 1.0):
        for draft_probs in (None, probs):
            out = ck.verify(
                logits, drafts, None, draft_probs, temperature=temperature, seed=2, backend=backend
            )
            assert_valid_output(out, drafts, None, vocab)
            assert out.tokens[2].tolist() == [7, 7, 7, 7]
            if temperature == 0.0:
                assert out.tokens[0, 0] == 0 and out.tokens[3, 0] == 0  # ties (all NaN, all -inf) go to id 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_tokens_do_not_depend_on_other_rows(backend):
    case = make_case(5, 6, 300, tree=True, with_probs=True, agree=0.8)
    full = run(case, backend, temperature=1.0, seed=21, offset=4)
    head = dict(
        case,
        target_logits=case["target_logits"][:2],
        draft_tokens=case["draft_tokens"][:2],
        draft_probs=case["draft_probs"][:2],
    )
    part = run(head, backend, temperature=1.0, seed=21, offset=4)
    for name, x, y in zip(full._fields, full, part, strict=True):
        assert torch.equal(x[:2], y), name
    # Changing another row's inputs changes nothing either.
    other = dict(case, target_logits=case["target_logits"].clone())
    other["target_logits"][4] = torch.randn(7, 300)
    changed = run(other, backend, temperature=1.0, seed=21, offset=4)
    for name, x, y in zip(full._fields, full, changed, strict=True):
        assert torch.equal(x[:4], y[:4]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_and_offset_select_the_noise(backend):
    case = make_case(12, 2, 50, with_probs=False, agree=0.5)
    base = run(case, backend, temperature=1.0, seed=5, offset=0).tokens
    assert torch.equal(base, run(case, backend, temperature=1.0, seed=5, offset=0).tokens)
    assert not torch.equal(base, run(case, backend, temperature=1.0, seed=5, offset=1).tokens)
    assert not torch.equal(base, run(case, backend, temperature=1.0, seed=6, offset=0).tokens)
    # A uint64 seed given as a Python int is the same key as its int64 bit pattern in a tensor.
    big = run(case, backend, temperature=1.0, seed=2**64 - 3)
    assert torch.equal(big.tokens, run(case, backend, temperature=1.0, seed=torch.tensor([-3])).tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_indices_and_broadcast_parents(backend):
    case = make_case(3, 5, 100, tree=True)
    expected = run(case, "reference")
    narrow = dict(case, draft_tokens=case["draft_tokens"].int(), parents=case["parents"].int().expand(3, 5))
    assert_same(run(narrow, backend), expected)


def test_malformed_tree_without_validation_is_safe():
    """validate_tree=False (graph capture): a node whose parent does not precede it is absent."""
    logits = one_hot_logits(1, [[1, 2, 3]], 5)
    drafts = torch.tensor([[1, 2]])
    bad_parents = torch.tensor([-1, 1])  # node 1 claims to be its own parent
    for backend in BACKENDS:
        out = ck.verify(logits, drafts, bad_parents, backend=backend, validate_tree=False)
        assert out.tokens.tolist() == [[1, 2, -1]] and out.num_accepted.tolist() == [1]


# ----------------------------------------------------------------------------------------------
# Bad inputs: named errors, never a crash
# ----------------------------------------------------------------------------------------------


def _good():
    return dict(
        target_logits=torch.randn(2, 4, 10),
        draft_tokens=torch.randint(0, 10, (2, 3)),
        parents=torch.tensor([-1, 0, 0]),
        draft_probs=torch.softmax(torch.randn(2, 4, 10), -1),
    )


BAD_INPUTS = [
    (dict(target_logits=[[0.0]]), {}, TypeError, "target_logits must be a torch.Tensor"),
    (dict(target_logits=torch.randn(4, 10)), {}, ValueError, "target_logits must be 3-D"),
    (
        dict(target_logits=torch.randn(2, 4, 10).double()),
        {},
        ValueError,
        "target_logits must be fp32, fp16 or bf16",
    ),
    (dict(target_logits=torch.randn(2, 4, 0)), {}, ValueError, "vocabulary size"),
    (
        dict(target_logits=torch.empty(2, 4, 2**30 + 1, device="meta")),
        {},
        ValueError,
        "in \\[1, 1073741824\\]",
    ),
    (dict(draft_tokens=torch.zeros(2, 3)), {}, ValueError, "draft_tokens must be int64 or int32"),
    (dict(draft_tokens=torch.zeros(6, dtype=torch.int64)), {}, ValueError, "draft_tokens must be 2-D"),
    (dict(draft_tokens=torch.zeros(3, 3, dtype=torch.int64)), {}, ValueError, "draft_tokens has batch 3"),
    (dict(target_logits=torch.randn(2, 3, 10)), {}, ValueError, "N\\+1 = 4 rows per request"),
    (dict(parents=torch.tensor([-1, 0, 2])), {}, ValueError, "bad tree: parents\\[2\\] = 2"),
    (dict(parents=torch.tensor([-1, -2, 0])), {}, ValueError, "bad tree: parents\\[1\\] = -2"),
    (dict(parents=torch.tensor([[-1, 0, 0], [-1, 0, 5]])), {}, ValueError, "bad tree: parents\\[1, 2\\] = 5"),
    (dict(parents=torch.tensor([-1, 0])), {}, ValueError, "parents must have shape"),
    (dict(parents=torch.tensor([-1.0, 0, 0])), {}, ValueError, "parents must be int64 or int32"),
    (dict(draft_probs=torch.rand(2, 4, 11)), {}, ValueError, "draft_probs vocabulary \\(11\\) must match"),
    (dict(draft_probs=torch.rand(2, 3, 10)), {}, ValueError, "draft_probs must be \\[B, N\\+1, V\\]"),
    (dict(draft_probs=torch.ones(2, 4, 10, dtype=torch.int64)), {}, ValueError, "draft_probs must be fp32"),
    (
        dict(draft_tokens=torch.zeros(2, 3, dtype=torch.int64, device="meta")),
        {},
        ValueError,
        "draft_tokens is on meta",
    ),
    (dict(draft_probs=torch.rand(2, 4, 10, device="meta")), {}, ValueError, "draft_probs is on meta"),
    ({}, dict(temperature=-0.5), ValueError, "temperature must be >= 0"),
    ({}, dict(temperature=float("nan")), ValueError, "temperature must be >= 0"),
    ({}, dict(temperature=INF), ValueError, "temperature must be >= 0 and finite"),
    ({}, dict(temperature="hot"), TypeError, "temperature must be a float or a tensor"),
    (
        {},
        dict(temperature=torch.tensor([1.0, 1.0, 1.0])),
        ValueError,
        "temperature must be a float or a \\[B\\]",
    ),
    ({}, dict(temperature=torch.tensor([1.0, -1.0])), ValueError, "temperature values must be >= 0"),
    (
        {},
        dict(temperature=torch.tensor([1.0, INF])),
        ValueError,
        "temperature values must be >= 0 and finite",
    ),
    ({}, dict(out=(1, 2)), TypeError, "out must be a VerifyBuffers"),
    (
        {},
        dict(out=reference.VerifyBuffers.empty(2, 2, "cpu")),
        ValueError,
        "out.tokens must be a contiguous \\[2, 4\\] torch.int64 tensor on cpu, got \\(2, 3\\)",
    ),
    ({}, dict(seed=-(2**64)), ValueError, "seed must fit in 64 bits"),
    ({}, dict(seed=1.5), TypeError, "seed must be an int"),
    ({}, dict(offset=torch.tensor([1.0])), ValueError, "offset tensor must be int64"),
    ({}, dict(offset=torch.tensor([1, 2, 3])), ValueError, "offset must be an int or a \\[B\\]"),
    ({}, dict(backend="flash"), ValueError, "backend must be one of"),
    ({}, dict(backend="cuda"), ValueError, "backend='cuda' needs CUDA tensors"),
]


@pytest.mark.parametrize("override,kwargs,error,message", BAD_INPUTS)
def test_bad_inputs_raise_named_errors(override, kwargs, error, message):
    inputs = dict(_good(), **override)
    with pytest.raises(error, match=message):
        ck.verify(**inputs, **kwargs)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ck.verify(**_good(), backend="triton")


def test_triton_interpreter_refuses_bf16():
    inputs = dict(_good(), target_logits=torch.randn(2, 4, 10, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="mishandles bf16"):
        ck.verify(**inputs, backend="triton")
    # The default picks the torch backend for bf16 on CPU instead of failing.
    assert_same(ck.verify(**inputs), ck.verify(**inputs, backend="torch"))
    assert_valid_output(ck.verify(**inputs), inputs["draft_tokens"], inputs["parents"], 10)


def test_default_backend_on_cpu(monkeypatch):
    from crossspec_kernels.ops._dispatch import pick_backend
    from crossspec_kernels.ops.verify import SUPPORTED_BACKENDS

    cpu = torch.device("cpu")
    assert pick_backend("verify", None, cpu, torch.float32, supported=SUPPORTED_BACKENDS) == "triton"
    assert pick_backend("verify", None, cpu, torch.bfloat16, supported=SUPPORTED_BACKENDS) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert pick_backend("verify", None, cpu, torch.float32, supported=SUPPORTED_BACKENDS) == "torch"
    # Ops without a torch backend fall back to the reference.
    assert pick_backend("compact_kv", None, cpu, torch.float32) == "reference"


def test_ops_without_a_torch_backend_refuse_it():
    with pytest.raises(ValueError, match="no 'torch' backend"):
        ck.compact_kv(
            [torch.zeros(1, 1, 4, 2)],
            torch.zeros(1, 1, dtype=torch.int64),
            torch.zeros(1, dtype=torch.int64),
            0,
            backend="torch",
        )
