"""Offline adapter quality: agreement with the target's greedy tokens and expected accepted length.

Scoring uses the reference ``lm_head_topk`` (adapter output -> target LM head -> top-k).

Two accepted-length estimates per chain length gamma (draft tokens accepted per round, the bonus /
correction token not counted):

* ``iid``: E[L] = sum_{i=1..gamma} a^i with a = top-1 agreement, i.e. every draft agrees
  independently with probability a.
* ``measured``: for each position t of a record, the length of the run of consecutive top-1
  agreements starting at t, capped at gamma, averaged over the positions whose window t..t+gamma-1
  lies inside the record (so runs are never cut short by the record's end). Under greedy verification
  this is exactly what a chain drafter fed the accepted tokens would get from position t: while its
  drafts agree, its context equals the target's greedy continuation the pairs were extracted from.
  (With ``use_target_hidden`` adapters it is optimistic: past the first draft the target's hidden
  state is not available at inference.) When no record is long enough for a gamma, the value is null.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from crossspec_kernels import reference
from crossspec_kernels.adapter_tools.data import Pairs

GAMMAS = tuple(range(1, 9))


def adapter_hidden(adapter, pairs: Pairs, start: int, stop: int) -> torch.Tensor:
    """Adapter output [n, d_target] for pairs[start:stop]; feeds the inputs the adapter's config asks for."""
    config = getattr(adapter, "config", None)
    target_hidden = None
    if getattr(config, "use_target_hidden", False):
        if pairs.target_prev_hidden is None:
            raise ValueError(
                "adapter uses the target's hidden state, but the pairs hold none (extract with --target-hidden)"
            )
        target_hidden = pairs.target_prev_hidden[start:stop]
    drafter_hidden, prev_tokens = pairs.drafter_hidden[start:stop], pairs.prev_tokens[start:stop]
    if getattr(config, "kind", None) == "eagle":
        # The eagle adapter attends causally over a sequence axis [..., T, d]; each pair is scored as a
        # window of one position (its own drafter state and previous token), so pairs stay independent
        # and can be shuffled. Longer windows would need record-ordered batches.
        drafter_hidden, prev_tokens = drafter_hidden[:, None], prev_tokens[:, None]
        target_hidden = None if target_hidden is None else target_hidden[:, None]
        out = adapter(drafter_hidden, prev_tokens=prev_tokens, target_hidden=target_hidden)
        return out[:, 0]
    return adapter(drafter_hidden, prev_tokens=prev_tokens, target_hidden=target_hidden)


@torch.no_grad()
def topk_predictions(
    adapter, pairs: Pairs, lm_head: torch.Tensor, k: int = 5, batch_size: int = 1024
) -> torch.Tensor:
    """Top-k token ids [N, k] of the adapter's drafts, scored by the target LM head (reference op)."""
    was_training = adapter.training
    adapter.eval()
    ids = []
    for start in range(0, len(pairs), batch_size):
        hidden = adapter_hidden(adapter, pairs, start, min(start + batch_size, len(pairs)))
        ids.append(reference.lm_head_topk(hidden.float(), lm_head, k)[1])
    adapter.train(was_training)
    return torch.cat(ids)


def run_lengths(agree: torch.Tensor, record_ids: torch.Tensor, positions: torch.Tensor, gamma: int):
    """Mean over windows inside a record of the leading run of agreements, capped at gamma."""
    order = torch.argsort(record_ids * (int(positions.max()) + 1) + positions)
    agree, record_ids = agree[order].tolist(), record_ids[order].tolist()
    runs = []
    for t in range(len(agree)):
        if t + gamma > len(agree) or record_ids[t + gamma - 1] != record_ids[t]:
            continue
        length = 0
        while length < gamma and agree[t + length]:
            length += 1
        runs.append(length)
    return (sum(runs) / len(runs), len(runs)) if runs else (None, 0)


def agreement_metrics(top_ids: torch.Tensor, pairs: Pairs, gammas=GAMMAS) -> dict:
    labels = pairs.target_tokens
    agree = top_ids[:, 0] == labels
    top1 = float(agree.float().mean())
    top5 = float((top_ids[:, :5] == labels[:, None]).any(dim=1).float().mean())
    iid = {str(g): sum(top1**i for i in range(1, g + 1)) for g in gammas}
    measured, windows = {}, {}
    for g in gammas:
        measured[str(g)], windows[str(g)] = run_lengths(agree, pairs.record_ids, pairs.positions, g)
    return {
        "num_pairs": len(pairs),
        "num_records": int(torch.unique(pairs.record_ids).numel()),
        "top1": top1,
        "top5": top5,
        "expected_accepted_length": {"iid": iid, "measured": measured, "measured_windows": windows},
    }


def evaluate_adapter(
    adapter, pairs: Pairs, lm_head: torch.Tensor, *, gammas=GAMMAS, batch_size: int = 1024
) -> dict:
    """Top-1/top-5 agreement and accepted lengths of ``adapter`` on ``pairs`` (see module docstring)."""
    if len(pairs) == 0:
        raise ValueError("evaluate: no pairs to evaluate")
    d_target = getattr(getattr(adapter, "config", None), "d_target", None)
    if d_target is not None and d_target != lm_head.shape[1]:
        raise ValueError(f"evaluate: adapter d_target={d_target} but the LM head is [V, {lm_head.shape[1]}]")
    ids = topk_predictions(adapter, pairs, lm_head, k=min(5, lm_head.shape[0]), batch_size=batch_size)
    return agreement_metrics(ids, pairs, gammas)


def format_table(results: dict[str, dict]) -> str:
    """A text table: one row per named result (e.g. untrained / trained)."""
    gammas = list(next(iter(results.values()))["expected_accepted_length"]["iid"])
    header = f"{'adapter':<12} {'pairs':>6} {'top1':>6} {'top5':>6}  " + " ".join(
        f"{'g=' + g:>6}" for g in gammas
    )
    lines = [header, "-" * len(header)]
    fmt = lambda v: f"{v:6.3f}" if v is not None else f"{'-':>6}"
    for name, res in results.items():
        lead = f"{name:<12} {res['num_pairs']:>6} {res['top1']:6.3f} {res['top5']:6.3f}  "
        lengths = res["expected_accepted_length"]
        lines.append(lead + " ".join(fmt(lengths["iid"][g]) for g in gammas) + "   E[L] iid")
        lines.append(
            " " * len(lead) + " ".join(fmt(lengths["measured"][g]) for g in gammas) + "   E[L] measured"
        )
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
