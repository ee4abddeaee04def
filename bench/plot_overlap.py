"""Plots for bench_overlap.py's results JSON: a two-lane timeline per variant and speedup vs alpha.

    python bench/plot_overlap.py RESULTS.json --out DIR

writes, into DIR:

* ``timeline-<variant>.png``: the target's prefill and the drafter's prefill and steps of the co-run
  (ms from the common origin; CUDA events on a GPU, perf_counter in a CPU smoke run), one lane each,
  with the makespan M, h and s in the title. For the goal drafter (the JSON's goals.drafter); other
  drafters get ``timeline-<drafter>-<variant>.png``.
* ``speedup_vs_alpha.png``: end-to-end speedup over target.generate (solid) and over HF assisted
  generation at the same alpha (dashed) per variant and drafter, against controlled acceptance alpha.

Needs matplotlib (``pip install matplotlib``, or the ``plot`` extra). Skipped variants have no plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LANE_COLORS = {"target": "tab:blue", "drafter": "tab:orange"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _label(payload: dict) -> str:
    if payload.get("smoke_test"):
        return "CPU SMOKE TEST (perf_counter; not a speed claim)"
    device = payload.get("environment", {}).get("device", {}).get("name", "?")
    return f"{device}, CUDA events"


def plot_timeline(payload: dict, drafter: str, name: str, variant: dict, path: Path) -> Path:
    plt = _pyplot()
    overlap = variant["overlap"]
    lanes = overlap["timeline"]["lanes"]
    fig, ax = plt.subplots(figsize=(10, 2.8))
    for row, lane in enumerate(("target", "drafter")):
        spans = lanes.get(lane, [])
        bars = [(span["start_ms"], max(span["end_ms"] - span["start_ms"], 1e-6)) for span in spans]
        colors = [
            "tab:green" if lane == "drafter" and "prefill" in span["name"] else LANE_COLORS[lane]
            for span in spans
        ]
        ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colors, edgecolors="black", linewidth=0.4)
    ax.axvline(
        overlap["M_ms"], color="red", linestyle="--", linewidth=1, label=f"M = {overlap['M_ms']:.2f} ms"
    )
    ax.set_yticks([0, 1], ["target", "drafter"])
    ax.set_xlabel(f"ms from the common origin ({overlap['timeline'].get('clock', '')})")
    h, s = overlap.get("hidden_fraction"), overlap.get("target_slowdown")
    ax.set_title(
        f"{drafter} / {name}: T_p {overlap['T_p_ms']:.2f} ms, T_d {overlap['T_d_ms']:.2f} ms, "
        f"h {h:.2f}, s {s:.2f}\n{_label(payload)}",
        fontsize=9,
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_speedup(payload: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for drafter, variants in payload.get("variants", {}).items():
        for name, variant in variants.items():
            if variant.get("status") != "ok":
                continue
            rows = sorted(variant["end_to_end"].values(), key=lambda row: row["alpha"])
            alphas = [row["alpha"] for row in rows]
            (line,) = ax.plot(
                alphas,
                [row["speedup_vs_target_generate"] for row in rows],
                marker="o",
                label=f"{drafter}/{name} vs target.generate",
            )
            ax.plot(
                alphas,
                [row["speedup_vs_hf_assisted"] for row in rows],
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{drafter}/{name} vs HF assisted",
            )
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel("controlled acceptance alpha")
    ax.set_ylabel("end-to-end speedup (total time ratio)")
    gamma = payload.get("request", {}).get("gamma")
    ax.set_title(f"speedup vs alpha, chain gamma {gamma}\n{_label(payload)}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(payload: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    goal_drafter = (payload.get("goals") or {}).get("drafter")
    drafters = payload.get("variants", {})
    written = []
    for drafter, variants in drafters.items():
        for name, variant in variants.items():
            if variant.get("status") != "ok":
                continue
            prefix = "timeline" if drafter == goal_drafter or len(drafters) == 1 else f"timeline-{drafter}"
            written.append(plot_timeline(payload, drafter, name, variant, out / f"{prefix}-{name}.png"))
    written.append(plot_speedup(payload, out / "speedup_vs_alpha.png"))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a bench_overlap.py results JSON")
    parser.add_argument("--out", default=".", help="directory for the PNGs (default: .)")
    args = parser.parse_args(argv)
    payload = json.loads(Path(args.results).read_text())
    if payload.get("op") != "overlap":
        parser.error(f"{args.results} is not a bench_overlap.py result (op={payload.get('op')!r})")
    for path in write_plots(payload, Path(args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
