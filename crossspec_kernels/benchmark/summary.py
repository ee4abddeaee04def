"""Aggregates of per-sample benchmark records, and the table printed from them (standard library only)."""

from __future__ import annotations

import math
import statistics

# (name in the aggregates, path in a sample record)
METRICS = (
    ("speedup", ("speedup",)),
    ("engine_total_ms", ("engine", "total_ms")),
    ("engine_ttft_ms", ("engine", "ttft_ms")),
    ("engine_prefill_share", ("engine", "prefill_share")),
    ("engine_prefill_ms", ("engine", "prefill_ms")),
    ("engine_decode_ms", ("engine", "decode_ms")),
    ("baseline_total_ms", ("baseline", "total_ms")),
    ("baseline_ttft_ms", ("baseline", "ttft_ms")),
    ("baseline_prefill_share", ("baseline", "prefill_share")),
    ("acceptance_rate", ("engine", "acceptance_rate")),
    ("mean_accepted_length", ("engine", "mean_accepted_length")),
    ("free_tokens_drafted", ("engine", "free_tokens_drafted")),
    ("free_tokens_accepted", ("engine", "free_tokens_accepted")),
    ("engine_tokens_per_s", ("engine", "tokens_per_s")),
    ("baseline_tokens_per_s", ("baseline", "tokens_per_s")),
    ("engine_peak_memory_bytes", ("engine", "peak_memory_bytes")),
    ("baseline_peak_memory_bytes", ("baseline", "peak_memory_bytes")),
)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def describe(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"n": 0, "mean": None, "median": None, "p10": None, "p90": None}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p10": percentile(values, 10),
        "p90": percentile(values, 90),
    }


def _get(record: dict, path: tuple[str, ...]):
    for key in path:
        record = record.get(key) if isinstance(record, dict) else None
    return record


def _sum_lists(lists: list[list[int]]) -> list[int]:
    total = [0] * max((len(values) for values in lists), default=0)
    for values in lists:
        for index, value in enumerate(values):
            total[index] += value
    return total


def acceptance_by_position(histogram: list[int]) -> list[float | None]:
    """alpha_k for k = 1, 2, ...: of the rounds that accepted at least k - 1 drafts, the share that
    accepted at least k (``histogram[j]``: rounds that drafted and accepted j drafts). A round that
    drafted fewer than k drafts and accepted them all counts as stopping before k, so this can sit a
    little below the engine's per_position_acceptance, which counts only rounds that drafted depth k."""
    reached = [sum(histogram[k:]) for k in range(len(histogram))]
    return [reached[k] / reached[k - 1] if reached[k - 1] else None for k in range(1, len(histogram))]


def aggregate(records: list[dict]) -> dict:
    """Mean, median, p10/p90 of every metric, the share of samples slower than target.generate, and
    the engine's accepted-length histograms summed over the samples, with alpha_k read off the sum."""
    histogram = _sum_lists([r["engine"]["accepted_length_histogram"] for r in records])
    speedups = [r["speedup"] for r in records]
    return {
        "samples": len(records),
        "identical": sum(r["identical"] for r in records),
        "share_slower_than_baseline": sum(s < 1 for s in speedups) / len(speedups),
        **{name: describe([_get(r, path) for r in records]) for name, path in METRICS},
        "accepted_length_histogram": histogram,
        "acceptance_by_position": acceptance_by_position(histogram),
    }


def format_table(length: int, summary: dict) -> str:
    def row(title: str, name: str, scale: float = 1.0, unit: str = "") -> str:
        stats = summary[name]
        if not stats["n"]:
            return f"  {title:<30} n/a"
        cells = [f"{stats[key] * scale:>10.2f}" for key in ("median", "p10", "p90", "mean")]
        return f"  {title:<30}" + "".join(cells) + (f"  {unit}" if unit else "")

    lines = [
        f"max_new_tokens {length}: {summary['samples']} samples, engine tokens identical to "
        f"target.generate on {summary['identical']}/{summary['samples']}, "
        f"{summary['share_slower_than_baseline']:.0%} slower than target.generate",
        f"  {'':<30}{'median':>10}{'p10':>10}{'p90':>10}{'mean':>10}",
        row("speedup vs target.generate", "speedup", unit="x"),
        row("target.generate total", "baseline_total_ms", unit="ms"),
        row("target.generate TTFT", "baseline_ttft_ms", unit="ms"),
        row("target prefill share", "baseline_prefill_share", 100, "% (TTFT / total, target.generate)"),
        row("engine total", "engine_total_ms", unit="ms"),
        row("engine TTFT", "engine_ttft_ms", unit="ms"),
        row("engine prefill share", "engine_prefill_share", 100, "% (target.prefill stage / total)"),
        row("acceptance rate", "acceptance_rate"),
        row("accepted drafts per round", "mean_accepted_length"),
        row("free tokens drafted", "free_tokens_drafted"),
        row("free tokens accepted", "free_tokens_accepted"),
        row("engine tokens/s", "engine_tokens_per_s"),
        row("target.generate tokens/s", "baseline_tokens_per_s"),
        row("engine peak memory", "engine_peak_memory_bytes", 2**-20, "MiB"),
        row("target.generate peak memory", "baseline_peak_memory_bytes", 2**-20, "MiB"),
    ]
    histogram = summary["accepted_length_histogram"]
    if histogram:
        lines.append(
            "  rounds accepting k drafts: " + ", ".join(f"{k}: {count}" for k, count in enumerate(histogram))
        )
    return "\n".join(lines)


def format_research_table(length: int, aggregates: dict) -> str:
    """The research's layout: target.generate, then one row per drafting (medians over the samples)."""

    def cell(value, spec: str) -> str:
        return format(value, spec) if value is not None else f"{'n/a':>{spec.split('.')[0]}}"

    first = next(iter(aggregates.values()))[str(length)]
    baseline_total, baseline_ttft = first["baseline_total_ms"]["median"], first["baseline_ttft_ms"]["median"]
    decode = None if baseline_total is None or baseline_ttft is None else baseline_total - baseline_ttft
    header = (
        f"{'max_new_tokens ' + str(length) + ' (medians)':<34}{'prefill ms':>11}{'decode ms':>11}{'total ms':>10}"
        f"{'speedup':>9}{'accept':>8}{'acc/round':>10}{'free':>6}{'free acc':>9}{'slower':>8}"
    )
    lines = [
        header,
        f"{'target.generate':<34}{cell(baseline_ttft, '11.1f')}{cell(decode, '11.1f')}"
        f"{cell(baseline_total, '10.1f')}{'1.00':>9}",
    ]
    for name, by_length in aggregates.items():
        summary = by_length[str(length)]
        medians = {metric: summary[metric]["median"] for metric, _ in METRICS}
        lines.append(
            f"{name[:33]:<34}{cell(medians['engine_prefill_ms'], '11.1f')}"
            f"{cell(medians['engine_decode_ms'], '11.1f')}{cell(medians['engine_total_ms'], '10.1f')}"
            f"{cell(medians['speedup'], '9.2f')}{cell(medians['acceptance_rate'], '8.2f')}"
            f"{cell(medians['mean_accepted_length'], '10.2f')}{cell(medians['free_tokens_drafted'], '6.1f')}"
            f"{cell(medians['free_tokens_accepted'], '9.1f')}{summary['share_slower_than_baseline']:>8.0%}"
        )
    return "\n".join(lines)
