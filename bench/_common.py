"""Helpers shared by the op microbenchmarks in bench/: device and peak bandwidth, timing, results.

Every ``bench/bench_<op>.py`` reports median with p20/p80, achieved GB/s and % of the device's HBM
bandwidth, with its baseline measured in the same run, and writes a JSON that names the device,
software versions, command, git commit and date (CONVENTIONS.md, Benchmarks). On a machine without
a GPU the benchmarks run a smoke mode: tiny shapes, a few iterations, and no speed claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# Benchmarks import this module before crossspec_kernels: an installed package wins, and a source
# checkout that was never installed still runs (`python bench/bench_verify.py` puts only bench/ on
# sys.path).
if importlib.util.find_spec("crossspec_kernels") is None:
    sys.path.append(str(REPO_ROOT))

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80: the order triton.testing.do_bench returns them in

SMOKE_BANNER = (
    "CPU SMOKE TEST: no CUDA device, so this run only checks that the benchmark and its baseline "
    "work, on tiny shapes for a few iterations. These numbers are NOT a speed claim."
)

# Peak HBM bandwidth from the vendors' datasheets, in TB/s (10**12 bytes/s). Matched against
# torch.cuda.get_device_name() in order, first match wins, so a specific pattern must precede a
# more general one. A name no pattern matches gets no peak: the % column is left empty rather
# than computed against a guess (pass --peak-gbs to supply one).
PEAK_HBM_TBPS: tuple[tuple[str, str, float], ...] = (
    # (regex over the lower-cased device name, label, TB/s)
    (r"h100.*pcie", "H100 PCIe (HBM2e)", 2.0),
    (r"h100.*nvl", "H100 NVL (HBM3)", 3.9),
    (r"h100.*(sxm|hbm3)", "H100 SXM (HBM3)", 3.35),  # the SXM5 part reports "H100 80GB HBM3"
    (r"gh200.*(144g|hbm3e)", "GH200 144GB (HBM3e)", 4.9),
    (r"gh200", "GH200 96GB (HBM3)", 4.0),
    (r"h200", "H200 (HBM3e)", 4.8),  # SXM and NVL both list 4.8 TB/s
    (r"h800.*pcie", "H800 PCIe (HBM2e)", 2.0),
    (r"h800", "H800 SXM (HBM3)", 3.35),
    (r"h20\b", "H20 (HBM3)", 4.0),
    (r"b200", "B200 (HBM3e)", 8.0),
    (r"a100.*(80gb|80g).*pcie|a100.*pcie.*80", "A100 80GB PCIe (HBM2e)", 1.935),
    (r"a100.*(sxm.*80|80.*sxm)", "A100 80GB SXM (HBM2e)", 2.039),
    (r"a100.*pcie", "A100 40GB PCIe (HBM2)", 1.555),
    (r"a100.*(sxm|40gb)", "A100 40GB SXM (HBM2)", 1.555),
    (r"a800.*80", "A800 80GB (HBM2e)", 2.039),
    (r"l40s", "L40S (GDDR6)", 0.864),
    (r"\bl4\b", "L4 (GDDR6)", 0.300),
    (r"a10g", "A10G (GDDR6)", 0.600),
    (r"\ba10\b", "A10 (GDDR6)", 0.600),
    (r"rtx 4090", "GeForce RTX 4090 (GDDR6X)", 1.008),
    (r"rtx 3090", "GeForce RTX 3090 (GDDR6X)", 0.936),
    (r"v100", "V100 (HBM2)", 0.900),
)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """The device a benchmark runs on, and the peak bandwidth its % column is computed against."""

    type: str  # "cuda" or "cpu"
    name: str
    peak_gbps: float | None  # GB/s (10**9 bytes/s); None = unknown, no % reported
    peak_source: str  # where peak_gbps came from, or why there is none
    label: str | None = None  # the table row that matched, e.g. "H100 SXM (HBM3)"
    capability: str | None = None
    multiprocessors: int | None = None
    memory_gib: float | None = None

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    @property
    def slug(self) -> str:
        """Short file-name-safe id, e.g. "h100-sxm" (for bench/results/<op>-<slug>-<date>.json)."""
        text = self.label or self.name
        text = re.sub(r"\(.*?\)", "", text).lower()
        return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def lookup_peak_hbm(device_name: str) -> tuple[str, float] | None:
    """(label, TB/s) for a torch.cuda.get_device_name() string, or None when not in the table.

    MIG slices get None: a slice has a fraction of the memory bandwidth that depends on its profile.
    """
    name = device_name.lower()
    if "mig" in name.split():
        return None
    for pattern, label, tbps in PEAK_HBM_TBPS:
        if re.search(pattern, name):
            return label, tbps
    return None


def describe_device(device: torch.device, *, peak_gbps: float | None = None) -> DeviceInfo:
    """Name and peak bandwidth of ``device``; ``peak_gbps`` overrides the table (e.g. --peak-gbs)."""
    if device.type != "cuda":
        return DeviceInfo(
            type=device.type,
            name=platform.processor() or platform.machine() or "cpu",
            peak_gbps=peak_gbps,
            peak_source="given on the command line" if peak_gbps else "CPU smoke test: no peak bandwidth",
        )
    props = torch.cuda.get_device_properties(device)
    name = torch.cuda.get_device_name(device)
    found = lookup_peak_hbm(name)
    label = found[0] if found else None
    if peak_gbps is not None:
        source = "given on the command line"
    elif found:
        peak_gbps = found[1] * 1000.0
        source = f"datasheet table in bench/_common.py: {found[0]}, {found[1]} TB/s"
    else:
        source = (
            f"unknown device {name!r}: not in bench/_common.py PEAK_HBM_TBPS, so no % of peak is "
            "reported (add it there or pass --peak-gbs)"
        )
    return DeviceInfo(
        type="cuda",
        name=name,
        peak_gbps=peak_gbps,
        peak_source=source,
        label=label,
        capability=f"{props.major}.{props.minor}",
        multiprocessors=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
    )


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    method: str


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_gpu(fn: Callable[[], object], *, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """Median, p20, p80 of ``fn`` on the current CUDA device via triton.testing.do_bench.

    do_bench synchronizes around its measurement, times each call with CUDA events, and zeroes a
    256 MB buffer before every call: L2 starts cold, so small inputs are not served from cache. The
    zeroing also lets the host run ahead, so Python launch overhead shows only when a call costs
    the host more than the GPU (or syncs, as torch.multinomial does). Warm up (Triton compiles,
    torch.compile traces) before calling this.
    """
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(
        median * 1e3, p20 * 1e3, p80 * 1e3, f"triton.testing.do_bench(warmup={warmup_ms}, rep={rep_ms})"
    )


def time_cpu(fn: Callable[[], object], *, iterations: int = 3, warmup: int = 1) -> Timing:
    """Wall-clock quantiles of ``fn`` on the host: for smoke tests only, never a speed claim."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    median, p20, p80 = (_quantile(times, q) for q in QUANTILES)
    return Timing(median, p20, p80, f"time.perf_counter, {iterations} iterations (CPU smoke test)")


def time_fn(fn: Callable[[], object], device: torch.device, *, quick: bool = False) -> Timing:
    if device.type == "cuda":
        return time_gpu(fn, warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100)
    return time_cpu(fn, iterations=2 if quick else 3)


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), as do_bench computes it."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def bandwidth_gbps(num_bytes: int, microseconds: float) -> float:
    return num_bytes / (microseconds * 1e-6) / 1e9


def percent_of_peak(gbps: float, device: DeviceInfo) -> float | None:
    return None if device.peak_gbps is None else 100.0 * gbps / device.peak_gbps


def benchmark_synced(benchmark, fn: Callable[[], object], device: torch.device, *, smoke: bool) -> None:
    """Run ``fn`` under the pytest-benchmark fixture, waiting for the GPU after every call.

    pytest-benchmark times with the host clock, so on a GPU each round synchronizes (the sync's few
    microseconds are in its numbers; the do_bench numbers in extra_info are the kernel times).
    """

    def run() -> None:
        fn()
        synchronize(device)

    if smoke:
        benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(run, rounds=100, iterations=1, warmup_rounds=10)


# ----------------------------------------------------------------------------------------------
# Environment and results
# ----------------------------------------------------------------------------------------------


def _run_text(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict:
    commit = _run_text(["git", "rev-parse", "HEAD"])
    status = _run_text(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "commit": commit,  # None: not a git checkout, or nothing committed yet
        "dirty": None if commit is None or status is None else bool(status),  # tracked files only
    }


def _extension_info() -> dict:
    from crossspec_kernels import _ext

    if not _ext.is_available():
        return {"built": False}
    module = _ext.get_module()
    info: dict = {"built": True}
    for name in ("cuda_archs", "cuda_version"):
        getter = getattr(module, name, None)
        if callable(getter):
            try:
                info[name] = getter()
            except Exception as error:  # report, never fail a benchmark over metadata
                info[name] = f"error: {error}"
    return info


def environment(device: DeviceInfo) -> dict:
    """What a committed result must name: device, software versions, command, git commit, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    driver = (
        _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if device.is_cuda
        else None
    )
    return {
        "device": dataclasses.asdict(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "nvidia_driver": driver.splitlines()[0] if driver else None,
        "crossspec_kernels_ext": _extension_info(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "platform": platform.platform(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "cwd": os.getcwd(),
        "git": git_state(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def default_results_path(op: str, device: DeviceInfo) -> Path:
    """bench/results/<op>-<device slug>-<YYYYMMDD>.json (the committed-results naming)."""
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    return RESULTS_DIR / f"{op}-{device.slug}-{day}.json"


def write_results(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table. columns: (key, header, format spec); None cells print as '-'."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    text = [
        "  ".join(
            cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(line, widths))
        )
        for line in cells
    ]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def script_arg_parser(op: str, description: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes; scripts add their own baselines' switches."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--out",
        help=f"results JSON path, or a directory to write {op}-<gpu>-<date>.json into (default on a GPU: "
        f"bench/results/{op}-<gpu>-<date>.json; on CPU nothing is written unless given)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing")
    parser.add_argument(
        "--cpu", action="store_true", help="run the CPU smoke test even when a GPU is present"
    )
    parser.add_argument("--peak-gbs", type=float, help="peak memory bandwidth in GB/s, overriding the table")
    return parser


def finish_run(
    op: str, out: str | None, smoke: bool, info: DeviceInfo, payload: dict, problems: list[str]
) -> int:
    """Write the results JSON (always on a GPU, on CPU only when asked), report problems, exit code."""
    path = out or (None if smoke else default_results_path(op, info))
    if path and os.path.isdir(path):
        path = os.path.join(path, default_results_path(op, info).name)
    if path:
        print(f"wrote {write_results(path, payload)}")
    elif smoke:
        print("no JSON written (CPU smoke test; pass --out to write one)")
    if problems:
        print(f"\n{len(problems)} PROBLEM(S):\n  " + "\n  ".join(problems))
        return 1
    return 0


def start_run(args: argparse.Namespace) -> tuple[torch.device, bool, DeviceInfo]:
    """(device, smoke, info) for a script run, with the smoke banner and the device line printed."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    smoke = device.type != "cuda"
    info = describe_device(device, peak_gbps=args.peak_gbs)
    if smoke:
        print(SMOKE_BANNER)
    print(f"device: {info.name}; peak bandwidth: {info.peak_source}")
    return device, smoke, info


def run_configs(configs, run_config) -> tuple[list[dict], list[str]]:
    """Run ``run_config(config) -> (rows, problems)`` over every config, printing each row's time."""
    all_rows, problems = [], []
    for config in configs:
        rows, found = run_config(config)
        all_rows += rows
        problems += found
        for row in rows:
            shown = f"{row['median_us']:.1f} us" if "median_us" in row else row.get("error", "")
            print(f"  {config}  {row['backend']:<11} {shown}", flush=True)
    return all_rows, problems


def results_payload(
    op: str, smoke: bool, info: DeviceInfo, backends, notes, rows: list[dict], problems: list[str], **details
) -> dict:
    """The committed-results JSON: environment, what was (not) timed and how, op details, rows."""
    return dict(
        op=op,
        smoke_test=smoke,
        note=SMOKE_BANNER if smoke else "GPU run",
        environment=environment(info),
        timed_backends=backends,
        not_timed=notes,
        timing=dict(
            quantiles=list(QUANTILES),
            method=next((row["timing_method"] for row in rows if "timing_method" in row), None),
            l2_flushed=not smoke,
        ),
        **details,
        results=rows,
        problems=problems,
    )
