"""Plots of a ``crossspec bench e2e`` result (the JSON), with matplotlib.

    python -m crossspec_kernels.benchmark.plots RESULT.json DIR

writes speedup_histogram.png (per-sample speedup vs target.generate, one colour per answer length),
acceptance_by_position.png (alpha_k per draft depth, from the summed accepted-length histogram), prefill_decode_breakdown.png (median prefill
and decode time of target.generate and of the engine per answer length) and
speedup_vs_answer_length.png (median speedup with its p10-p90 range).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PLOT_FILES = (
    "speedup_histogram.png",
    "acceptance_by_position.png",
    "prefill_decode_breakdown.png",
    "speedup_vs_answer_length.png",
)


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib, which is not installed: pip install matplotlib") from error
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _median(records: list[dict], *path: str) -> float:
    from crossspec_kernels.benchmark.summary import describe

    values = []
    for record in records:
        for key in path:
            record = record[key]
        values.append(record)
    return describe(values)["median"] or 0.0


def write_plots(result: dict, folder: str | Path) -> list[Path]:
    """The four PNGs of the module docstring in ``folder`` (created if missing); their paths.
    Every drafting of the run (``--adapter``) gets its own series."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    aggregates = result["aggregates"]
    names = list(aggregates)
    lengths = [int(length) for length in aggregates[names[0]]]
    runs = {
        (name, n): [r for r in result["samples"] if r["max_new_tokens"] == n and r["drafting"] == name]
        for name in names
        for n in lengths
    }
    title = f"{result['environment']['device']}, {result['settings']['draft']}"
    paths = [folder / name for name in PLOT_FILES]

    def label(name: str, n: int) -> str:
        return f"{n} tokens" if len(names) == 1 else f"{name}, {n} tokens"

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.hist(
        [[r["speedup"] for r in records] for records in runs.values()],
        bins=20,
        label=[label(name, n) for name, n in runs],
    )
    axes.axvline(1.0, color="black", linestyle="--", linewidth=1)
    axes.set(xlabel="speedup vs target.generate (per sample)", ylabel="samples", title=title)
    axes.legend(fontsize="small")
    figure.savefig(paths[0], dpi=120, bbox_inches="tight")

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, n in runs:
        alphas = aggregates[name][str(n)]["acceptance_by_position"]
        depths = [k + 1 for k, alpha in enumerate(alphas) if alpha is not None]
        axes.plot(depths, [a for a in alphas if a is not None], marker="o", label=label(name, n))
    axes.set(xlabel="draft depth k", ylabel="P(accepted >= k | accepted >= k-1)", ylim=(0, 1.05), title=title)
    axes.legend(fontsize="small")
    figure.savefig(paths[1], dpi=120, bbox_inches="tight")

    figure, axes = plt.subplots(figsize=(7, 4))
    bars = [("target.generate", names[0], ("baseline", "ttft_ms"), ("baseline", "total_ms"))] + [
        (name, name, ("engine", "prefill_ms"), ("engine", "total_ms")) for name in names
    ]
    width = 0.8 / len(bars)
    for offset, (bar, name, prefill, total) in enumerate(bars):
        prefill_ms = [_median(runs[name, n], *prefill) for n in lengths]
        decode_ms = [max(_median(runs[name, n], *total) - p, 0.0) for n, p in zip(lengths, prefill_ms)]
        x = [p + (offset - (len(bars) - 1) / 2) * width for p in range(len(lengths))]
        axes.bar(x, prefill_ms, width=width, label=f"{bar} prefill")
        axes.bar(x, decode_ms, width=width, bottom=prefill_ms, label=f"{bar} decode", alpha=0.6)
    axes.set_xticks(list(range(len(lengths))), [f"{n} tokens" for n in lengths])
    axes.set(ylabel="median ms", title=f"prefill / decode ({title})")
    axes.legend(fontsize="small")
    figure.savefig(paths[2], dpi=120, bbox_inches="tight")

    figure, axes = plt.subplots(figsize=(6, 4))
    for name in names:
        stats = [aggregates[name][str(n)]["speedup"] for n in lengths]
        medians = [s["median"] for s in stats]
        low = [m - s["p10"] for m, s in zip(medians, stats)]
        high = [s["p90"] - m for m, s in zip(medians, stats)]
        axes.errorbar(lengths, medians, yerr=[low, high], marker="o", capsize=4, label=name)
    axes.axhline(1.0, color="black", linestyle="--", linewidth=1)
    axes.set(xlabel="max_new_tokens", ylabel="speedup (median, p10-p90)", xscale="log", title=title)
    axes.legend(fontsize="small")
    figure.savefig(paths[3], dpi=120, bbox_inches="tight")
    plt.close("all")
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m crossspec_kernels.benchmark.plots RESULT.json DIR", file=sys.stderr)
        return 2
    for path in write_plots(json.loads(Path(argv[0]).read_text()), argv[1]):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
