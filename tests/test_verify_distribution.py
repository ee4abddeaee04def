"""Statistical tests of rejection resampling (``verify``, contract in ARCHITECTURE.md).

Every check here is exactly true for any correct sampler, whatever its noise: we compare the
emitted tokens of >= 40,000 seeded trials with the law the contract implies, computed independently
in float64 (no code shared with the sampler).

The law of a walk, for a fixed tree: at the node the accepted prefix ends at, the next output is the
pair (emitted token, whether it is an accepted child), with

* deterministic candidates (``draft_probs`` None): token ~ p, accepted iff the token is a child's;
* children drawn i.i.d. from q (recursive rejection): the i-th child is accepted with token x with
  probability prod_{j<i}(1 - a_j) * min(p_i, q)(x), and with probability prod_j (1 - a_j) all are
  rejected and x ~ p_k is emitted, where p_0 = p, p_{i+1} = norm((p_i - q)+), a_i = sum min(p_i, q).
  The two add up to p: the emitted token follows the target.

and, conditioned on the accepted prefix (the path and its tokens), the next output depends only on the
node the prefix ends at. ``assert_walk_law`` checks exactly that, one chi-square per (node, prefix)
group (bins with expected count < 5 merged; outcomes of probability 0 must never occur), and all groups
together. The tests are seeded, hence deterministic; the thresholds are still ~5 sigma wide so that
any correct implementation (or a change of the noise layout) passes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from crossspec_kernels import reference

verify = reference.verify  # the sampler under test

ALPHA = 1e-6  # per chi-square test (~4.9 sigma); seeded, so deterministic anyway
MIN_EXPECTED = 5.0  # bins with a smaller expected count are merged
MIN_GROUP = 1000  # prefix groups with fewer trials are pooled per node (their law is the same)
IMPOSSIBLE = 1e-12  # an outcome less likely than this must never be observed
TRIALS = 40_000


# ----------------------------------------------------------------------------------------------
# Goodness of fit
# ----------------------------------------------------------------------------------------------


def merge_small_bins(observed: np.ndarray, expected: np.ndarray, min_expected: float = MIN_EXPECTED):
    """Pool the least likely bins until the pooled bin's expected count reaches ``min_expected``."""
    order = np.argsort(expected, kind="stable")
    observed, expected = observed[order], expected[order]
    if expected[0] >= min_expected:
        return observed, expected
    cut = int(np.searchsorted(np.cumsum(expected), min_expected)) + 1  # bins [0, cut) are pooled
    cut = min(cut, len(expected))
    return (
        np.concatenate([[observed[:cut].sum()], observed[cut:]]),
        np.concatenate([[expected[:cut].sum()], expected[cut:]]),
    )


class ChiSquare:
    """Collects chi-square goodness-of-fit tests; ``check`` asserts each one and their sum."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, float, int, float]] = []
        self.failures: list[str] = []

    def add(self, observed, probs, label: str) -> None:
        observed = np.asarray(observed, dtype=np.float64)
        probs = np.asarray(probs, dtype=np.float64)
        assert observed.shape == probs.shape, label
        probs = probs / probs.sum()
        n = observed.sum()
        impossible = (probs < IMPOSSIBLE) & (observed > 0)
        if impossible.any():
            self.failures.append(
                f"{label}: impossible outcomes {np.flatnonzero(impossible).tolist()} observed"
            )
        possible = probs >= IMPOSSIBLE
        obs, exp = merge_small_bins(observed[possible], n * probs[possible])
        if len(obs) < 2:
            return  # too few trials for a test; the impossibility check above still applies
        stat = float(((obs - exp) ** 2 / exp).sum())
        df = len(obs) - 1
        pvalue = float(stats.chi2.sf(stat, df))
        self.parts.append((label, stat, df, pvalue))
        if pvalue < ALPHA:
            self.failures.append(
                f"{label}: chi2={stat:.1f} df={df} p={pvalue:.2e}\n  observed {obs.astype(int).tolist()}"
                f"\n  expected {np.round(exp, 1).tolist()}"
            )

    def check(self) -> None:
        assert self.parts, "no chi-square test had enough trials"
        stat = sum(part[1] for part in self.parts)
        df = sum(part[2] for part in self.parts)
        pvalue = float(stats.chi2.sf(stat, df))
        if pvalue < ALPHA:
            self.failures.append(
                f"all {len(self.parts)} groups together: chi2={stat:.1f} df={df} p={pvalue:.2e}"
            )
        assert not self.failures, "\n".join(self.failures)


def assert_matches(samples, probs, label: str = "samples") -> None:
    """Samples (ints in [0, len(probs))) follow ``probs``: chi-square, small bins merged."""
    samples = np.asarray(samples)
    assert samples.size and samples.min() >= 0 and samples.max() < len(probs), label
    fit = ChiSquare()
    fit.add(np.bincount(samples, minlength=len(probs)), probs, label)
    fit.check()


# ----------------------------------------------------------------------------------------------
# The law the contract implies, in float64
# ----------------------------------------------------------------------------------------------


def target_probs(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """p = softmax(logits / T) per row, float64; -inf logits have p = 0."""
    return torch.softmax(logits.double() / temperature, dim=-1).numpy()


def candidate_law(p: np.ndarray, child_tokens) -> tuple[np.ndarray, np.ndarray]:
    """(accepted, stopped) law of one node with deterministic candidates: y ~ p, accepted iff a child."""
    is_child = np.zeros(len(p), dtype=bool)
    is_child[list(child_tokens)] = True
    return np.where(is_child, p, 0.0), np.where(is_child, 0.0, p)


def rejection_law(p: np.ndarray, q: np.ndarray, num_children: int) -> tuple[np.ndarray, np.ndarray]:
    """(accepted, stopped) law of recursive rejection with ``num_children`` children drawn i.i.d. from q."""
    accepted = np.zeros_like(p)
    reach = 1.0  # probability that every earlier child was rejected
    current = p
    for _ in range(num_children):
        overlap = np.minimum(current, q)
        accepted += reach * overlap
        reach *= 1.0 - overlap.sum()
        residual = np.clip(current - q, 0.0, None)
        if residual.sum() > 0:  # else the overlap was 1 and reach is now 0
            current = residual / residual.sum()
    stopped = reach * current
    np.testing.assert_allclose(accepted + stopped, p, atol=1e-12)  # the emitted token follows p
    return accepted, stopped


def tree_children(parents: list[int], draft_tokens: list[int] | None = None) -> list[list[int]]:
    """children[s]: present nodes under slot s (0 = root, i + 1 = node i)."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for node, parent in enumerate(parents):
        if draft_tokens is None or draft_tokens[node] >= 0:
            children[parent + 1].append(node)
    return children


def greedy_walk(logits: torch.Tensor, draft_tokens: list[int], parents: list[int]) -> list[int]:
    """Temperature 0: follow the target argmax through the tree, emit it where no child holds it."""
    children = tree_children(parents, draft_tokens)
    out, slot = [], 0
    while True:
        y = int(torch.argmax(logits[slot]))
        match = [c for c in children[slot] if draft_tokens[c] == y]
        out.append(y)
        if not match:
            return out
        slot = match[0] + 1


# ----------------------------------------------------------------------------------------------
# Checking a batch of walks
# ----------------------------------------------------------------------------------------------


def as_numpy(out) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return out.tokens.numpy(), out.num_accepted.numpy(), out.path.numpy()


def assert_walk_structure(out, draft_tokens: torch.Tensor, parents: list[int], vocab: int) -> None:
    """Accepted nodes form a root path whose tokens are output; then one token in [0, V); -1 after."""
    tokens, num_accepted, path = as_numpy(out)
    drafts = np.broadcast_to(draft_tokens.numpy(), path.shape)
    parents_np = np.asarray(parents)
    batch, num_nodes = path.shape
    assert tokens.shape == (batch, num_nodes + 1)
    assert ((num_accepted >= 0) & (num_accepted <= num_nodes)).all()
    steps = np.arange(num_nodes)
    accepted = steps[None, :] < num_accepted[:, None]
    assert (path[~accepted] == -1).all()
    node = np.where(accepted, path, 0)
    assert ((node >= 0) & (node < num_nodes)).all()
    previous = np.concatenate([np.full((batch, 1), -1), path[:, :-1]], axis=1)
    assert (np.where(accepted, parents_np[node] == previous, True)).all(), "path is not a root path"
    assert (np.where(accepted, tokens[:, :-1] == np.take_along_axis(drafts, node, axis=1), True)).all()
    rows = np.arange(batch)
    last = tokens[rows, num_accepted]
    assert ((last >= 0) & (last < vocab)).all()
    assert (tokens[np.arange(num_nodes + 1)[None, :] > num_accepted[:, None]] == -1).all()


def assert_walk_law(
    out, accepted_law: np.ndarray, stopped_law: np.ndarray, fit: ChiSquare, label: str
) -> None:
    """Conditioned on the accepted prefix, (next token, accepted?) follows the law of its node.

    accepted_law / stopped_law: [N + 1, V] per slot (0 = root, i + 1 = node i). Groups are the distinct
    (node, prefix tokens); groups smaller than MIN_GROUP are pooled per node.
    """
    tokens, num_accepted, path = as_numpy(out)
    vocab = accepted_law.shape[1]
    law = np.concatenate([stopped_law, accepted_law], axis=1)  # bin = token + V * accepted
    for step in range(tokens.shape[1]):
        reached = num_accepted >= step
        if not reached.any():
            continue
        slot = np.zeros(reached.sum(), dtype=np.int64) if step == 0 else path[reached, step - 1] + 1
        outcome = tokens[reached, step] + vocab * (num_accepted[reached] > step)
        keys, group, sizes = np.unique(
            np.column_stack([slot, tokens[reached, :step]]), axis=0, return_inverse=True, return_counts=True
        )
        group = group.reshape(-1)
        counts = np.zeros((len(keys), 2 * vocab))
        np.add.at(counts, (group, outcome), 1)
        pooled: dict[int, np.ndarray] = {}
        for g, key in enumerate(keys):
            s = int(key[0])
            if sizes[g] >= MIN_GROUP:
                fit.add(counts[g], law[s], f"{label} step {step} node slot {s} prefix {key[1:].tolist()}")
            else:
                pooled[s] = pooled.get(s, 0) + counts[g]
        for s, c in pooled.items():
            fit.add(c, law[s], f"{label} step {step} node slot {s} small prefixes pooled")


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


def random_logits(gen: torch.Generator, slots: int, vocab: int, scale: float = 1.5) -> torch.Tensor:
    """[slots, V] logits with one -inf entry per row (p(x) = 0), at token slot % V."""
    logits = scale * torch.randn(slots, vocab, generator=gen)
    logits[torch.arange(slots), torch.arange(slots) % vocab] = float("-inf")
    return logits


def random_draft_probs(gen: torch.Generator, slots: int, vocab: int, toward: torch.Tensor | None = None):
    """[slots, V] draft distributions with zeros (q(x) = 0) at tokens (slot + 1) % V and (slot + 3) % V;
    q is positive where p (see random_logits) is 0, so those draws must always be rejected.
    ``toward``: half of q's mass follows these probabilities (a drafter that agrees more often)."""
    q = torch.softmax(1.5 * torch.randn(slots, vocab, generator=gen), dim=-1)
    if toward is not None:
        q = 0.5 * q + 0.5 * toward
    for shift in (1, 3):
        q[torch.arange(slots), (torch.arange(slots) + shift) % vocab] = 0.0
    return q / q.sum(dim=-1, keepdim=True)


def draw_children(gen: torch.Generator, q: torch.Tensor, parents: list[int], batch: int) -> torch.Tensor:
    """[B, N] draft tokens: node i drawn from q[parents[i] + 1], all independent."""
    return torch.stack(
        [torch.multinomial(q[p + 1], batch, replacement=True, generator=gen) for p in parents], dim=1
    )


def per_row_seeds(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct int64 seeds (negative ones included) and offsets above 2**32."""
    seed = torch.randint(-(2**62), 2**62, (batch,), generator=gen)
    offset = torch.randint(0, 2**40, (batch,), generator=gen)
    return seed, offset


def expand(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.expand(batch, *x.shape)


# ----------------------------------------------------------------------------------------------
# The checker itself can fail
# ----------------------------------------------------------------------------------------------


def test_checker_rejects_wrong_distributions():
    gen = np.random.default_rng(0)
    p = np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05, 0.0])
    assert_matches(gen.choice(8, TRIALS, p=p), p)
    shifted = p.copy()
    shifted[0] -= 0.01  # one point of mass moved between two bins
    shifted[1] += 0.01
    with pytest.raises(AssertionError, match="chi2"):
        assert_matches(gen.choice(8, TRIALS, p=shifted), p)
    tempered = p ** (1 / 0.9) / (p ** (1 / 0.9)).sum()  # temperature 0.9 instead of 1
    with pytest.raises(AssertionError, match="chi2"):
        assert_matches(gen.choice(8, TRIALS, p=tempered), p)
    with pytest.raises(AssertionError, match="impossible"):  # a single p = 0 token emitted
        assert_matches(np.append(gen.choice(8, TRIALS, p=p), 7), p)
    # a sample with the right marginal but repeated 8 times (e.g. an ignored seed word)
    with pytest.raises(AssertionError, match="chi2"):
        assert_matches(np.repeat(gen.choice(8, TRIALS // 8, p=p), 8), p)


# ----------------------------------------------------------------------------------------------
# Chains with draft probabilities (recursive rejection sampling, one child per node)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vocab", "temperature"), [(6, 1.0), (10, 0.7)])
def test_chain_with_draft_probs_follows_target(vocab, temperature):
    gamma, batch = 3, TRIALS
    gen = torch.Generator().manual_seed(1000 + vocab)
    logits = random_logits(gen, gamma + 1, vocab)
    q = random_draft_probs(gen, gamma + 1, vocab, torch.softmax(logits / temperature, dim=-1))
    parents = list(range(-1, gamma - 1))
    drafts = draw_children(gen, q, parents, batch)
    seed, offset = per_row_seeds(gen, batch)
    out = verify(
        expand(logits, batch),
        drafts,
        None,
        expand(q, batch),
        temperature=temperature,
        seed=seed,
        offset=offset,
    )
    assert_walk_structure(out, drafts, parents, vocab)

    p = target_probs(logits, temperature)
    laws = [rejection_law(p[s], q[s].double().numpy(), 1 if s < gamma else 0) for s in range(gamma + 1)]
    fit = ChiSquare()
    tokens, num_accepted, _ = as_numpy(out)
    for step in range(gamma + 1):  # the marginal at each position, given that the walk got there
        fit.add(np.bincount(tokens[num_accepted >= step, step], minlength=vocab), p[step], f"position {step}")
    assert_walk_law(out, np.stack([a for a, _ in laws]), np.stack([s for _, s in laws]), fit, "chain")
    fit.check()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chain_accepted_length_histogram(temperature):
    """P(num_accepted >= k) = prod_{i<k} alpha_i with alpha_i = sum_x min(p_i(x), q_i(x))."""
    gamma, vocab, batch = 5, 8, TRIALS
    gen = torch.Generator().manual_seed(2000)
    logits = random_logits(gen, gamma + 1, vocab, scale=1.0)
    q = random_draft_probs(gen, gamma + 1, vocab, torch.softmax(logits / temperature, dim=-1))
    q[2] = torch.softmax(logits[2] / temperature, dim=-1)  # p == q: alpha = 1 at node 2
    parents = list(range(-1, gamma - 1))
    drafts = draw_children(gen, q, parents, batch)
    out = verify(
        expand(logits, batch), drafts, None, expand(q, batch), temperature=temperature, seed=7, offset=3
    )

    p = target_probs(logits, temperature)
    alpha = np.minimum(p[:gamma], q[:gamma].double().numpy()).sum(axis=1)
    assert alpha.min() > 0.2 and alpha.max() > 1 - 1e-6  # a range of acceptance rates, one node certain
    reach = np.concatenate([[1.0], np.cumprod(alpha)])  # P(num_accepted >= k)
    histogram = reach - np.append(reach[1:], 0.0)  # P(num_accepted == k)
    fit = ChiSquare()
    fit.add(np.bincount(out.num_accepted.numpy(), minlength=gamma + 1), histogram, "accepted length")
    fit.check()


# ----------------------------------------------------------------------------------------------
# Trees with deterministic candidates (draft_probs None)
# ----------------------------------------------------------------------------------------------

# Root children 0, 1, 2 (token 0 of node 2 has p = 0 at the root, see random_logits: never accepted);
# node 0 has children 3, 4; node 1 has child 5; node 3 has child 6 (depth 3); node 7 is absent (-1)
# and its child 8 must never be reached.
TREE_PARENTS = [-1, -1, -1, 0, 0, 1, 3, -1, 7]
TREE_TOKENS = [1, 4, 0, 2, 6, 3, 5, -1, 2]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_tree_with_candidates_follows_target(temperature):
    vocab, batch = 8, TRIALS
    gen = torch.Generator().manual_seed(3000)
    logits = random_logits(gen, len(TREE_PARENTS) + 1, vocab, scale=1.2)
    drafts = torch.tensor(TREE_TOKENS)
    out = verify(
        expand(logits, batch),
        expand(drafts, batch),
        torch.tensor(TREE_PARENTS),
        temperature=temperature,
        seed=11,
        offset=torch.arange(batch) * 977,
    )
    assert_walk_structure(out, drafts, TREE_PARENTS, vocab)
    assert (out.path != 7).all() and (out.path != 8).all()

    p = target_probs(logits, temperature)
    children = tree_children(TREE_PARENTS, TREE_TOKENS)
    laws = [candidate_law(p[s], [TREE_TOKENS[c] for c in children[s]]) for s in range(len(p))]
    fit = ChiSquare()
    fit.add(np.bincount(out.tokens[:, 0].numpy(), minlength=vocab), p[0], "first token")
    assert_walk_law(out, np.stack([a for a, _ in laws]), np.stack([s for _, s in laws]), fit, "tree")
    fit.check()


# ----------------------------------------------------------------------------------------------
# Trees whose children were drawn i.i.d. from q (recursive rejection with several children)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vocab", "temperature"), [(6, 1.0), (8, 0.8)])
def test_tree_with_draft_probs_follows_target(vocab, temperature):
    # root: 3 children; node 0: 2 children; node 1: 1 child; node 3: 2 children.
    parents = [-1, -1, -1, 0, 0, 1, 3, 3]
    batch = TRIALS
    gen = torch.Generator().manual_seed(4000 + vocab)
    logits = random_logits(gen, len(parents) + 1, vocab, scale=1.0)
    q = random_draft_probs(gen, len(parents) + 1, vocab)
    drafts = draw_children(gen, q, parents, batch)
    seed, _ = per_row_seeds(gen, batch)
    out = verify(
        expand(logits, batch),
        drafts,
        torch.tensor(parents),
        expand(q, batch),
        temperature=temperature,
        seed=seed,
    )
    assert_walk_structure(out, drafts, parents, vocab)

    p = target_probs(logits, temperature)
    children = tree_children(parents)
    laws = [rejection_law(p[s], q[s].double().numpy(), len(children[s])) for s in range(len(p))]
    fit = ChiSquare()
    fit.add(np.bincount(out.tokens[:, 0].numpy(), minlength=vocab), p[0], "first token")
    assert_walk_law(out, np.stack([a for a, _ in laws]), np.stack([s for _, s in laws]), fit, "tree")
    fit.check()


# ----------------------------------------------------------------------------------------------
# Per-row temperature: greedy and sampled rows in one batch
# ----------------------------------------------------------------------------------------------

MIXED_TEMPERATURES = (0.0, 0.7, 1.3)


def mixed_temperature(batch: int) -> torch.Tensor:
    return torch.tensor(MIXED_TEMPERATURES)[torch.arange(batch) % len(MIXED_TEMPERATURES)]


def test_per_row_temperature_tree_with_candidates():
    vocab, batch = 8, 60_000
    gen = torch.Generator().manual_seed(5000)
    logits = random_logits(gen, len(TREE_PARENTS) + 1, vocab, scale=1.2)
    # make the greedy walk go deep: the argmax at the root is node 0's token, at node 0 node 3's, ...
    for slot, token in ((0, 1), (1, 2), (4, 5)):
        logits[slot, token] = logits[slot].max() + 0.5
    drafts = torch.tensor(TREE_TOKENS)
    temperature = mixed_temperature(batch)
    outs = [
        verify(
            expand(logits, batch),
            expand(drafts, batch),
            torch.tensor(TREE_PARENTS),
            temperature=temperature,
            seed=12,
            offset=offset,
        )
        for offset in (0, 1)
    ]
    expected_greedy = greedy_walk(logits, TREE_TOKENS, TREE_PARENTS)
    assert len(expected_greedy) == 4
    children = tree_children(TREE_PARENTS, TREE_TOKENS)
    for out in outs:
        assert_walk_structure(out, drafts, TREE_PARENTS, vocab)
        greedy_rows = out.tokens[temperature == 0]
        assert (greedy_rows[:, : len(expected_greedy)] == torch.tensor(expected_greedy)).all()
        assert (greedy_rows[:, len(expected_greedy) :] == -1).all()
    for t in MIXED_TEMPERATURES[1:]:
        p = target_probs(logits, t)
        laws = [candidate_law(p[s], [TREE_TOKENS[c] for c in children[s]]) for s in range(len(p))]
        fit = ChiSquare()
        for i, out in enumerate(outs):
            rows = temperature == t
            sub = reference.VerifyOutput(out.tokens[rows], out.num_accepted[rows], out.path[rows])
            fit.add(
                np.bincount(sub.tokens[:, 0].numpy(), minlength=vocab), p[0], f"T={t} call {i} first token"
            )
            assert_walk_law(
                sub, np.stack([a for a, _ in laws]), np.stack([s for _, s in laws]), fit, f"T={t} call {i}"
            )
        fit.check()


def test_per_row_temperature_chain_with_draft_probs():
    gamma, vocab, batch = 3, 8, 60_000
    gen = torch.Generator().manual_seed(6000)
    logits = random_logits(gen, gamma + 1, vocab, scale=1.0)
    slots = torch.arange(gamma + 1)
    logits[slots, (slots + 2) % vocab] = logits.amax(dim=-1) + 0.5  # an argmax that q can draw
    q = random_draft_probs(gen, gamma + 1, vocab, torch.softmax(logits, dim=-1))
    parents = list(range(-1, gamma - 1))
    drafts = draw_children(gen, q, parents, batch)
    temperature = mixed_temperature(batch)
    seed, offset = per_row_seeds(gen, batch)
    out = verify(
        expand(logits, batch),
        drafts,
        None,
        expand(q, batch),
        temperature=temperature,
        seed=seed,
        offset=offset,
    )
    assert_walk_structure(out, drafts, parents, vocab)

    greedy = (temperature == 0).numpy()
    tokens, num_accepted, _ = as_numpy(out)
    argmax = logits.argmax(dim=-1).numpy()
    matches = drafts.numpy()[greedy] == argmax[None, :gamma]
    expected_accepted = np.where(matches.all(axis=1), gamma, matches.argmin(axis=1))  # first mismatch
    assert matches.any(axis=0).all() and (expected_accepted > 0).any()  # the argmax walk goes somewhere
    np.testing.assert_array_equal(num_accepted[greedy], expected_accepted)
    np.testing.assert_array_equal(tokens[greedy, expected_accepted], argmax[expected_accepted])

    for t in MIXED_TEMPERATURES[1:]:
        rows = temperature == t
        sub = reference.VerifyOutput(out.tokens[rows], out.num_accepted[rows], out.path[rows])
        p = target_probs(logits, t)
        laws = [rejection_law(p[s], q[s].double().numpy(), 1 if s < gamma else 0) for s in range(gamma + 1)]
        fit = ChiSquare()
        fit.add(np.bincount(sub.tokens[:, 0].numpy(), minlength=vocab), p[0], f"T={t} first token")
        assert_walk_law(sub, np.stack([a for a, _ in laws]), np.stack([s for _, s in laws]), fit, f"T={t}")
        fit.check()


# ----------------------------------------------------------------------------------------------
# Seeds and offsets
# ----------------------------------------------------------------------------------------------


def seeded_problem(batch: int, *, with_draft_probs: bool, seed: int = 0):
    """A tree problem whose rows all differ (logits, drafts, temperatures, seeds, offsets)."""
    vocab, parents = 8, [-1, -1, 0, 0, 1, 2]
    gen = torch.Generator().manual_seed(7000 + seed)
    logits = 2.0 * torch.randn(batch, len(parents) + 1, vocab, generator=gen)
    q = torch.softmax(torch.randn(batch, len(parents) + 1, vocab, generator=gen), dim=-1)
    drafts = torch.randint(0, vocab, (batch, len(parents)), generator=gen)
    temperature = torch.rand(batch, generator=gen) + 0.5
    temperature[::5] = 0.0
    seeds, offsets = per_row_seeds(gen, batch)
    return {
        "args": (logits, drafts, torch.tensor(parents), q if with_draft_probs else None),
        "kwargs": {"temperature": temperature, "seed": seeds, "offset": offsets},
    }


def rows_of(problem, rows: slice):
    logits, drafts, parents, q = problem["args"]
    kwargs = {k: v[rows] for k, v in problem["kwargs"].items()}
    return {"args": (logits[rows], drafts[rows], parents, None if q is None else q[rows]), "kwargs": kwargs}


def run(problem):
    return verify(*problem["args"], **problem["kwargs"])


def assert_same_output(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_same_seed_offset_row_is_reproducible(with_draft_probs):
    problem = seeded_problem(256, with_draft_probs=with_draft_probs)
    assert_same_output(run(problem), run(problem))
    # a scalar seed/offset means the same as that value in every row
    problem["kwargs"].update(seed=123, offset=2**33 + 5)
    scalar = run(problem)
    problem["kwargs"].update(seed=torch.full((256,), 123), offset=torch.full((256,), 2**33 + 5))
    assert_same_output(scalar, run(problem))


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_other_rows_do_not_change_a_request(with_draft_probs):
    full = seeded_problem(96, with_draft_probs=with_draft_probs)
    other = seeded_problem(96, with_draft_probs=with_draft_probs, seed=1)  # different rows 40..95
    for key in ("temperature", "seed", "offset"):
        other["kwargs"][key][:40] = full["kwargs"][key][:40]
    logits, drafts, parents, q = other["args"]
    logits[:40], drafts[:40] = full["args"][0][:40], full["args"][1][:40]
    if q is not None:
        q[:40] = full["args"][3][:40]
    a, b, alone = run(full), run(other), run(rows_of(full, slice(0, 40)))
    for x, y, z in zip(a, b, alone):
        torch.testing.assert_close(x[:40], y[:40], rtol=0, atol=0)
        torch.testing.assert_close(x[:40], z, rtol=0, atol=0)
    sampled = full["kwargs"]["temperature"][40:] > 0
    assert (a.tokens[40:][sampled] != b.tokens[40:][sampled]).any()  # the other rows did change


SEED_WORD_CHANGES = {
    "seed_low_word": ("seed", 1),
    "seed_high_word": ("seed", 2**32),
    "offset_low_word": ("offset", 1),
    "offset_high_word": ("offset", 2**32),
}


@pytest.mark.parametrize("change", list(SEED_WORD_CHANGES))
def test_every_seed_and_offset_word_gives_fresh_samples(change):
    """The same rows over 50 values of one 32-bit word of the seed or offset: 10,000 trials that must
    follow the target; a sampler ignoring that word would repeat each row's sample 50 times."""
    key, step = SEED_WORD_CHANGES[change]
    vocab, batch, calls = 8, 200, 50
    gen = torch.Generator().manual_seed(8000)
    logits = random_logits(gen, len(TREE_PARENTS) + 1, vocab, scale=1.2)
    kwargs = {"temperature": 0.9, "seed": 99, "offset": 17}
    first_tokens = []
    for i in range(calls):
        kwargs[key] = 17 + i * step
        out = verify(
            expand(logits, batch),
            expand(torch.tensor(TREE_TOKENS), batch),
            torch.tensor(TREE_PARENTS),
            **kwargs,
        )
        first_tokens.append(out.tokens[:, 0])
    first_tokens = torch.stack(first_tokens)  # [calls, batch]
    assert_matches(first_tokens.reshape(-1).numpy(), target_probs(logits, 0.9)[0], change)
    # and consecutive values disagree as often as two independent draws do: 1 - sum p^2
    disagree = (first_tokens[1:] != first_tokens[:-1]).double().mean().item()
    p0 = target_probs(logits, 0.9)[0]
    expected = 1 - (p0**2).sum()
    sigma = np.sqrt(expected * (1 - expected) / ((calls - 1) * batch))
    assert abs(disagree - expected) < 6 * sigma, (disagree, expected)


# ----------------------------------------------------------------------------------------------
# Extreme noise words (reference only: Philox is replaced by a constant)
# ----------------------------------------------------------------------------------------------


def constant_philox(word: int):
    """Stand-in for reference.philox4x32_10 returning ``word`` for every counter and lane."""

    def philox(counter, key):
        shape = torch.broadcast_shapes(*(torch.as_tensor(x).shape for x in (*counter, *key)))
        return tuple(torch.full(shape, word, dtype=torch.int64) for _ in range(4))

    return philox


@pytest.mark.parametrize("word", [0, 0xFFFFFFFF])
@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_zero_probability_token_is_never_emitted_for_extreme_noise_words(monkeypatch, word, with_draft_probs):
    """Whatever the noise, the race must pick a token with p > 0: with every uniform equal it is the
    argmax of p. The draft token (p = 0, q > 0) must be rejected and the residual sampled."""
    monkeypatch.setattr(reference, "philox4x32_10", constant_philox(word))
    vocab = 8
    logits = torch.full((1, 2, vocab), float("-inf"))
    logits[0, :, 3], logits[0, :, 5] = 0.0, 1.0  # p(3), p(5) > 0; every other token has p = 0
    drafts = torch.tensor([[6]])
    q = torch.full((1, 2, vocab), 1.0 / vocab) if with_draft_probs else None
    out = reference.verify(logits, drafts, None, q, temperature=1.0, seed=1)
    assert out.num_accepted.item() == 0
    assert out.tokens[0, 0].item() in (3, 5)
