"""The one harness of bench/: arguments, device and environment, timing, checked backends, tables, JSON.

Every ``bench/bench_<op>.py`` states only its cases (configs, inputs, backends, checks) and hands them
to :func:`run_op_benchmark` (script mode) and :func:`pytest_benchmark` (pytest mode): each backend is
checked against the reference before it is timed, median with p20/p80, GB/s and % of the device's HBM
bandwidth are reported with the baselines of the same run, and the JSON names the device, software
versions, command, git commit and date (CONVENTIONS.md, Benchmarks). The end-to-end benchmarks
(bench_e2e, bench_overlap) share :func:`e2e_arg_parser`, :func:`quantiles` and the generate helpers
here, and their models from ``bench/models.py``. On a machine without a GPU every benchmark runs a
smoke mode: tiny shapes, a few iterations, and no speed claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
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

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
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


def quantiles(values) -> dict | None:
    """{"median", "p20", "p80"} of the values that are not None (None when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(zip(("median", "p20", "p80"), (_quantile(values, q) for q in QUANTILES)))


def median(values):
    found = quantiles(values)
    return None if found is None else found["median"]


def bandwidth_gbps(num_bytes: int, microseconds: float) -> float:
    return num_bytes / (microseconds * 1e-6) / 1e9


def percent_of_peak(gbps: float, device: DeviceInfo) -> float | None:
    return None if device.peak_gbps is None else 100.0 * gbps / device.peak_gbps


def timing_fields(timing: Timing, num_bytes: int, info: DeviceInfo, *, peak: bool = True) -> dict:
    """A row's time columns: median/p20/p80 us, GB/s, % of HBM peak, and how it was timed."""
    gbps = bandwidth_gbps(num_bytes, timing.median_us)
    return dict(
        median_us=timing.median_us,
        p20_us=timing.p20_us,
        p80_us=timing.p80_us,
        gbps=gbps,
        pct_peak=percent_of_peak(gbps, info) if peak else None,
        timing_method=timing.method,
    )


# ----------------------------------------------------------------------------------------------
# Backends: which of ours can run here, and one config measured over all of them
# ----------------------------------------------------------------------------------------------


def kernel_backends(wanted: Sequence[str] = ("cuda", "triton")) -> tuple[list[str], list[str]]:
    """The package's GPU backends among ``wanted`` that can run here, and notes on the others."""
    from crossspec_kernels import _ext
    from crossspec_kernels.ops._dispatch import triton_available

    chosen, notes = [], []
    if "cuda" in wanted:
        if _ext.is_available():
            chosen.append("cuda")
        else:
            notes.append("cuda: crossspec_kernels._C is not built (see `crossspec info`)")
    if "triton" in wanted:
        if triton_available():
            chosen.append("triton")
        else:
            notes.append("triton: not installed")
    return chosen, notes


ORACLE_NOTE = "reference: run once per config as the correctness oracle, not timed"


def extension_built() -> bool:
    from crossspec_kernels import _ext

    return _ext.is_available()


def config_fields(config, *, drop: Sequence[str] = (), **rename: str) -> dict:
    """A row's description of a config dataclass: its fields (``rename``: field=new key), dtypes by
    short name."""
    fields = {}
    for name, value in dataclasses.asdict(config).items():
        if name not in drop:
            fields[rename.get(name, name)] = (
                DTYPE_NAMES.get(value, value) if isinstance(value, torch.dtype) else value
            )
    return fields


def measure_backends(
    config,
    backends: Sequence[str],
    prepare: Callable[[str], tuple[Callable[[], object], dict, list[str] | None]],
    *,
    device: torch.device,
    info: DeviceInfo,
    quick: bool,
    num_bytes: int,
    fields: dict,
    optional: Sequence[str] = (),
    host_timed: Sequence[str] = (),
) -> tuple[list[dict], list[str]]:
    """One row per backend: ``prepare(backend) -> (fn, extra fields, problems or None)`` makes one
    untimed call and checks it (warming up compiles too); then ``fn`` is timed. A backend that raises
    becomes an error row (a problem unless it is ``optional``), so it never loses the others' numbers.
    ``host_timed`` backends are host code: wall clock whatever the device, no % of HBM peak."""
    rows, problems = [], []
    for backend in backends:
        row = dict(config=str(config), **fields, backend=backend, bytes=num_bytes)
        try:
            fn, extra, found = prepare(backend)
            row.update(extra)
            if found is not None:
                row["checks"] = "ok" if not found else "; ".join(found)
                problems += [f"{config} {backend}: {p}" for p in found]
            host = backend in host_timed
            timing = time_cpu(fn, iterations=2 if quick else 5) if host else time_fn(fn, device, quick=quick)
        except Exception as error:  # one broken backend must not lose the others' numbers
            row["error"] = f"{type(error).__name__}: {str(error)[:500]}"
            if backend not in optional:
                problems.append(f"{config} {backend}: {row['error']}")
            rows.append(row)
            continue
        row.update(timing_fields(timing, num_bytes, info, peak=not host))
        rows.append(row)
    return rows, problems


def add_speedups(rows: list[dict], baselines: Sequence[str], *, only: Sequence[str] | None = None) -> None:
    """``speedup_vs_<baseline>`` = baseline median / row median, on every timed row (or ``only``)."""
    times = {row["backend"]: row["median_us"] for row in rows if "median_us" in row}
    for row in rows:
        if "median_us" in row and (only is None or row["backend"] in only):
            for baseline in baselines:
                if baseline in times:
                    row[f"speedup_vs_{baseline}"] = times[baseline] / row["median_us"]


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


def results_path(out: str, op: str, device: DeviceInfo) -> Path:
    """``--out``: a JSON path, or a directory to write <op>-<device>-<date>.json into."""
    return Path(out, default_results_path(op, device).name) if os.path.isdir(out) else Path(out)


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


def op_columns(*extra: tuple[str, str, str], gbps: str = ".1f", pct: str = "% HBM") -> tuple:
    """The op tables' columns: config, backend, median/p20/p80, GB/s, % HBM, then ``extra``."""
    return (
        ("config", "config", ""),
        ("backend", "backend", ""),
        ("median_us", "median us", ".1f"),
        ("p20_us", "p20 us", ".1f"),
        ("p80_us", "p80 us", ".1f"),
        ("gbps", "GB/s", gbps),
        ("pct_peak", pct, ".1f"),
        *extra,
    )


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
    path = results_path(out, op, info) if out else (None if smoke else default_results_path(op, info))
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


def report_and_finish(op, args, smoke, info, backends, notes, rows, problems, **details) -> int:
    """Print the smoke banner (again, below the tables), build the payload, write it, exit code."""
    if smoke:
        print(SMOKE_BANNER)
    payload = results_payload(op, smoke, info, backends, notes, rows, problems, **details)
    return finish_run(op, args.out, smoke, info, payload, problems)


def run_op_benchmark(
    op: str,
    args: argparse.Namespace,
    backends_for: Callable[[torch.device, bool], tuple[list[str], list[str]]],
    configs: Callable[..., list],
    measure: Callable,
    columns: Sequence[tuple[str, str, str]],
    *,
    after: Callable[[list[dict], torch.device, DeviceInfo, list[str]], tuple[dict, list[str]]] | None = None,
    **details,
) -> int:
    """Script mode of an op benchmark: device, backends, every config measured, table, JSON, exit code.

    ``backends_for(device, smoke) -> (timed, notes)``; ``measure(config, device, info, backends,
    quick=) -> (rows, problems)``; ``after(rows, device, info, backends) -> (details, problems)`` prints
    and measures whatever comes after the main table (a second table, goals)."""
    device, smoke, info = start_run(args)
    backends, notes = backends_for(device, smoke)
    print(f"timed: {', '.join(backends)}" + "".join(f"\nnot timed: {note}" for note in notes))
    rows, problems = run_configs(
        configs(smoke=smoke, quick=args.quick),
        lambda config: measure(config, device, info, backends, quick=args.quick),
    )
    print()
    print(format_table(rows, columns))
    if after is not None:
        more, found = after(rows, device, info, backends)
        details.update(more)
        problems += found
    return report_and_finish(op, args, smoke, info, backends, notes, rows, problems, **details)


# ----------------------------------------------------------------------------------------------
# pytest mode: `pytest bench/` (bench/conftest.py collects bench_*.py)
# ----------------------------------------------------------------------------------------------

PYTEST_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PYTEST_SMOKE = PYTEST_DEVICE.type != "cuda"


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


def pytest_benchmark(benchmark, fn: Callable[[], object], config, num_bytes: int, *, host=False, **extra):
    """A checked ``fn`` under pytest-benchmark; on a GPU also its do_bench time, GB/s and % of peak
    in extra_info (``host``: host code, pytest-benchmark's own clock only)."""
    info = describe_device(PYTEST_DEVICE)
    benchmark.group = str(config)
    benchmark.extra_info.update(device=info.name, smoke_test=PYTEST_SMOKE, bytes=num_bytes, **extra)
    if not PYTEST_SMOKE and not host:
        fields = timing_fields(time_fn(fn, PYTEST_DEVICE), num_bytes, info)
        benchmark.extra_info.update(
            do_bench_median_us=fields["median_us"],
            do_bench_p20_us=fields["p20_us"],
            do_bench_p80_us=fields["p80_us"],
            gbps=fields["gbps"],
            pct_peak=fields["pct_peak"],
        )
    benchmark_synced(benchmark, fn, PYTEST_DEVICE, smoke=PYTEST_SMOKE or host)


def raise_recompile_limit(limit: int = 256) -> None:
    """One graph per shape (dynamic=False): raise dynamo's recompile limit above the number of configs,
    or it would quietly fall back to eager after the default 8."""
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), limit))


# ----------------------------------------------------------------------------------------------
# End to end (bench_e2e, bench_overlap): arguments, timed generate calls, summaries, token checks
# ----------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from error


def name_list(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def e2e_arg_parser(
    op: str, description: str, *, drafters: Sequence[str], defaults: dict
) -> argparse.ArgumentParser:
    """The end-to-end benchmarks' options; ``defaults`` holds the help text of the preset-dependent
    defaults (keys: preset, drafters, max_new_tokens, repeats, free_token_budget)."""
    parser = script_arg_parser(op, description)
    parser.add_argument("--preset", choices=("tiny", "7b"), help=defaults["preset"])
    parser.add_argument(
        "--drafters",
        type=name_list,
        help=f"7b preset: drafters from {','.join(drafters)} ({defaults['drafters']})",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help=f"tokens per request ({defaults['max_new_tokens']})"
    )
    parser.add_argument("--repeats", type=int, help=f"timed runs per variant ({defaults['repeats']})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant before timing (1)")
    parser.add_argument(
        "--free-token-budget", type=int, default=defaults.get("free_token_budget_value"),
        help=f"engine free_token_budget ({defaults['free_token_budget']})",
    )  # fmt: skip
    parser.add_argument(
        "--backend",
        choices=("cuda", "triton", "reference"),
        help="force the engine's kernel backend (default: by device)",
    )
    return parser


def check_e2e_args(parser, args, drafters: Sequence[str]) -> argparse.Namespace:
    """Argument errors name the flag; the preset defaults to 7b with CUDA, tiny without."""
    if args.drafters is not None and any(name not in drafters for name in args.drafters):
        parser.error(f"--drafters: choose from {','.join(drafters)}, got {','.join(args.drafters)}")
    for name in ("repeats", "free_token_budget", "max_new_tokens"):
        value, least = getattr(args, name), 2 if name == "max_new_tokens" else 1
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if args.preset is None:
        args.preset = "7b" if torch.cuda.is_available() and not args.cpu else "tiny"
    if args.preset == "7b" and (args.cpu or not torch.cuda.is_available()):
        parser.exit(
            2, f"{parser.prog} --preset 7b needs a CUDA device; use --preset tiny for the CPU smoke test\n"
        )
    return args


class TokenClock:
    """A generate() streamer: the time the first new tokens reach the host, and the number of puts."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.puts: list[float] = []

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def ttft_ms(self) -> float | None:
        # The first put is the prompt; the second carries the first new token(s).
        return (self.puts[1] - self.start) * 1e3 if len(self.puts) > 1 else None

    @property
    def rounds(self) -> int:
        return max(len(self.puts) - 1, 0)


def hf_assistant_settings(gamma: int | None) -> dict:
    """HF assisted: a fixed chain of gamma drafts, or HF's defaults (20 drafts, confidence 0.4)."""
    if gamma is None:
        return dict(
            num_assistant_tokens=20,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=0.4,
        )
    return dict(
        num_assistant_tokens=gamma,
        num_assistant_tokens_schedule="constant",
        assistant_confidence_threshold=0.0,
    )


def timed_generate(target, inputs: dict, new_tokens: int, device, *, assistant=None, gamma=None) -> dict:
    """``target.generate`` greedy with EOS stopping off (with ``assistant``: HF assisted generation),
    wall clock with the device synchronised: {"tokens", "total_ms", "ttft_ms", "rounds"}; TTFT and
    rounds from a streamer (HF copies each round's tokens to the host there)."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)  # None: no EOS stop
    saved = {}
    if assistant is not None:
        kwargs["assistant_model"] = assistant
        config = assistant.generation_config
        # Set on every call: HF's heuristic schedule and threshold persist on the assistant.
        for name, value in hf_assistant_settings(gamma).items():
            saved[name] = getattr(config, name, None)
            setattr(config, name, value)
    try:
        synchronize(device)
        clock = TokenClock()
        with torch.no_grad():
            out = target.generate(**inputs, streamer=clock, **kwargs)
        synchronize(device)
        total_ms = (time.perf_counter() - clock.start) * 1e3
    finally:
        for name, value in saved.items():
            setattr(assistant.generation_config, name, value)
    tokens = out[:, inputs["input_ids"].shape[1] :].cpu()
    return dict(tokens=tokens, total_ms=total_ms, ttft_ms=clock.ttft_ms, rounds=clock.rounds)


def timed_engine(engine, target_inputs: dict, drafter_inputs, new_tokens: int, device, **kwargs) -> dict:
    """``CrossSpecEngine.generate`` greedy, EOS stopping off, wall clock with the device synchronised:
    {"tokens", "total_ms", "ttft_ms", "stats"} (TTFT and the rest from the engine's public stats)."""
    synchronize(device)
    start = time.perf_counter()
    out = engine.generate(
        target_inputs,
        drafter_inputs,
        max_new_tokens=new_tokens,
        temperature=0.0,
        seed=0,
        eos_token_id=[],
        **kwargs,
    )
    synchronize(device)
    total_ms = (time.perf_counter() - start) * 1e3
    return dict(tokens=out.sequences.cpu(), total_ms=total_ms, ttft_ms=out.stats["ttft_ms"], stats=out.stats)


def time_summary(runs: list[dict], new_tokens: int) -> dict:
    """total_ms, ttft_ms and tokens_per_s as {"median", "p20", "p80"} over the runs."""
    totals = [run["total_ms"] for run in runs]
    return dict(
        total_ms=quantiles(totals),
        ttft_ms=quantiles([run["ttft_ms"] for run in runs]),
        tokens_per_s=quantiles([new_tokens / (t / 1e3) for t in totals]),
    )


ENGINE_STATS = (
    "acceptance_rate",
    "mean_accepted_length",
    "tokens_per_round",
    "free_tokens",
    "free_tokens_accepted",
    "rounds",
)


def engine_summary(runs: list[dict], label: str) -> tuple[dict, list[str]]:
    """Medians of the engine's public stats over the runs (stage_ms per stage), and whether it fell
    back to target-only decoding (a problem)."""
    stats = [run["stats"] for run in runs]
    row = {key: median([s[key] for s in stats]) for key in ENGINE_STATS}
    row["engine_tokens_per_s"] = quantiles([s["tokens_per_s"] for s in stats])
    row["stage_ms"] = {
        stage: median([s["stage_ms"].get(stage, 0.0) for s in stats]) for stage in stats[0]["stage_ms"]
    }
    row["fallback"] = any(s["fallback"] for s in stats)
    problems = []
    if row["fallback"]:
        reasons = {s["fallback_reason"] for s in stats if s["fallback"]}
        problems.append(f"{label}: the engine fell back to target-only decoding: {reasons}")
    return row, problems


def check_tokens(row: dict, runs: list[dict], reference, dtype: torch.dtype, label: str) -> list[str]:
    """row["tokens_identical"]: every run's tokens equal the reference's first tokens. A mismatch is a
    problem in fp32 (the losslessness contract); in bf16 a near-tie between the one-token and the
    many-token forward can flip a token, so it is a note."""
    tokens = runs[0]["tokens"]
    expected = reference[:, : tokens.shape[1]].cpu()
    same = tokens.shape == expected.shape and all(torch.equal(run["tokens"], expected) for run in runs)
    row["tokens_identical"] = same
    if same:
        return []
    common = min(tokens.shape[1], expected.shape[1])
    diff = (tokens[0, :common] != expected[0, :common]).nonzero()
    row["first_mismatch"] = int(diff[0]) if len(diff) else common
    message = f"{label}: greedy tokens differ from target.generate (first at {row['first_mismatch']})"
    if dtype == torch.float32:
        return [message]
    row["mismatch_note"] = f"{message}; {dtype} near-ties, the losslessness contract is fp32"
    return []


def free_cuda_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
