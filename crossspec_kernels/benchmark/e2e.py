"""The manifest-driven end-to-end benchmark: ``crossspec bench e2e --manifest FILE.jsonl``.

Also ``python -m crossspec_kernels.benchmark.e2e --manifest FILE.jsonl``. For every answer length
and sample, in this order: ``target.generate`` (greedy, the target's own attention), then
``CrossSpecEngine.generate`` on the same inputs; the engine's tokens must equal the baseline's
(a mismatch is printed and makes the exit status 1), then timings, acceptance and memory are
recorded. ``--adapter`` (repeatable) runs the engine once per adapter or feature head beside the
one baseline run: a record per (sample, answer length, drafting), aggregates per drafting. HF assisted generation (``target.generate(assistant_model=drafter)``) is tried once;
when it cannot run with these models, the reason is reported and no number is made up.

Models: the tiny random Video-LLaVA target and EventGPT drafter of ``crossspec demo`` (the
drafter's LM a copy of the target's). They have no tokenizer: a question's UTF-8 bytes become
token ids, and end of sequence is disabled so that every answer runs ``max_new_tokens`` tokens.
CPU timings are smoke tests, not speed claims.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import NamedTuple

import torch

IDENTITY = "identity"  # --adapter value: the drafter's hidden states as they are (no adapter)
_MODELS = (
    "tiny random Video-LLaVA (testing_models.tiny_video_llava) + tiny random EventGPT drafter "
    "(its LM copied from the target's)"
)


# ----------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------


def build_tiny_models(seed: int, event_layout: str, device: torch.device):
    """(target, drafter): the drafter's LM starts as a copy of the target's, as in the demo."""
    from crossspec_kernels.models.eventgpt import EventGPTForCausalLM, eventgpt_config
    from crossspec_kernels.testing_models import tiny_video_llava

    target = tiny_video_llava(seed=seed)
    target.generation_config.eos_token_id = None  # answers run max_new_tokens (see the docstring)
    torch.manual_seed(seed + 1)
    config = eventgpt_config("tiny", original_layout=event_layout == "original")
    drafter = EventGPTForCausalLM(config).eval()
    drafter.model.language_model.load_state_dict(target.model.language_model.state_dict())
    drafter.lm_head.load_state_dict(target.lm_head.state_dict())
    return target.to(device), drafter.to(device)


def question_ids(question: str) -> torch.Tensor:
    """A byte-level stand-in tokenizer for the tiny models: ids in [3, IMAGE_TOKEN_ID)."""
    from crossspec_kernels.testing_models import IMAGE_TOKEN_ID

    return torch.tensor([3 + byte % (IMAGE_TOKEN_ID - 3) for byte in question.encode("utf-8")])


def make_request(sample, drafter_config, device: torch.device) -> tuple[dict, dict, int]:
    """(target inputs, drafter inputs, number of events) of one manifest sample."""
    from crossspec_kernels import events_to_frames
    from crossspec_kernels.demo import tiny_inputs
    from crossspec_kernels.generate_inputs import load_events, load_video
    from crossspec_kernels.testing_models import NUM_FRAMES

    frames, _ = load_video(str(sample.video), NUM_FRAMES)
    events, _ = load_events(str(sample.events), sample.window_us, sample.sensor_size)
    raster = events_to_frames(
        events.x,
        events.y,
        events.t,
        events.p,
        sensor_size=events.sensor_size,
        representation="eventgpt",
        num_frames=drafter_config.num_frames,
    )
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)
    target_inputs, drafter_inputs = tiny_inputs(
        video, raster, question_ids(sample.question), drafter_config, device
    )
    return target_inputs, drafter_inputs, len(events)


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of one run: CUDA max allocated, or on CPU the peak RSS (VmHWM, which Linux lets
    a process reset through /proc/self/clear_refs; elsewhere the process's lifetime peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as file:
                file.write("5")
        except OSError:
            self.kind = "cpu_peak_rss_since_process_start"

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "cpu_peak_rss":
            with open("/proc/self/status") as file:
                for line in file:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class _FirstTokenClock:
    """An HF streamer that keeps the time of each put(): the first is the prompt, the second the
    first new token, so the second minus the start is target.generate's TTFT."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, value) -> None:
        if len(self.times) < 2:
            _sync(self.device)
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_baseline(target, target_inputs, max_new_tokens, memory: PeakMemory, attention: str) -> dict:
    """target.generate, greedy, on the target's own attention implementation."""
    device = target_inputs["input_ids"].device
    target.set_attn_implementation({"text_config": attention})  # the engine switched it to "crossspec"
    clock = _FirstTokenClock(device)
    prompt = target_inputs["input_ids"].shape[1]
    memory.reset()
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        output = target.generate(
            **target_inputs, do_sample=False, max_new_tokens=max_new_tokens, streamer=clock
        )
    _sync(device)
    total_s = time.perf_counter() - start
    tokens = output[:, prompt:].cpu()
    ttft_ms = (clock.times[1] - start) * 1e3 if len(clock.times) > 1 else None
    return {
        "tokens": tokens,
        "total_ms": total_s * 1e3,
        "ttft_ms": ttft_ms,
        "prefill_share": None if ttft_ms is None else ttft_ms / (total_s * 1e3),
        "tokens_per_s": tokens.shape[1] / total_s,
        "peak_memory_bytes": memory.read(),
    }


class Drafting(NamedTuple):
    """One engine configuration the benchmark runs: an adapter (or a feature head) beside the drafter."""

    name: str  # the research's label (L1, L2, ..., B1) and the folder, or "identity"
    adapter: torch.nn.Module | None
    feature_head: torch.nn.Module | None

    def engine(self, target, drafter, settings: dict):
        from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine

        return CrossSpecEngine(
            target,
            drafter,
            self.adapter,
            feature_head=self.feature_head,
            draft=ChainDraft(settings["gamma"]),
            free_token_budget=settings["free_token_budget"],
            backend=settings["backend"],
        )


def load_draftings(specs: list[str], target, drafter, settings: dict) -> list[Drafting]:
    """``--adapter`` values as engine configurations, each built once here so that an adapter that
    does not fit these models fails before anything is timed (ValueError naming the folder)."""
    from crossspec_kernels.models.adapters import FEATURE_HEAD_KINDS, load_adapter

    device = next(target.parameters()).device
    draftings = []
    for spec in specs:
        if spec == IDENTITY:
            draftings.append(Drafting(IDENTITY, None, None))
            continue
        module = load_adapter(spec, device=device, dtype=torch.float32)
        config = module.config
        name = f"{config.label or config.kind} ({os.path.basename(os.path.normpath(spec))})"
        is_head = config.kind in FEATURE_HEAD_KINDS
        drafting = Drafting(name, None if is_head else module, module if is_head else None)
        try:
            drafting.engine(target, drafter, settings)
        except ValueError as error:
            raise ValueError(f"--adapter {spec}: does not fit the benchmark's models: {error}") from None
        draftings.append(drafting)
    return draftings


def run_engine(drafting: Drafting, models, request, max_new_tokens, settings, memory) -> dict:
    target, drafter, _ = models
    target_inputs, drafter_inputs, _ = request
    engine = drafting.engine(target, drafter, settings)
    memory.reset()
    output = engine.generate(target_inputs, drafter_inputs, max_new_tokens=max_new_tokens)
    peak = memory.read()
    stats = output.stats
    prefill_ms = stats["stage_ms"].get("target.prefill")
    return {
        "tokens": output.sequences.cpu(),
        "total_ms": stats["total_ms"],
        "ttft_ms": stats["ttft_ms"],
        "prefill_ms": prefill_ms,
        "prefill_share": None if prefill_ms is None else prefill_ms / stats["total_ms"],
        "decode_ms": None if prefill_ms is None else stats["total_ms"] - prefill_ms,
        "free_tokens_drafted": stats["free_tokens"],
        "free_tokens_accepted": stats["free_tokens_accepted"],
        "acceptance_rate": stats["acceptance_rate"],
        "mean_accepted_length": stats["mean_accepted_length"],
        "per_position_acceptance": stats["per_position_acceptance"],
        "accepted_length_histogram": stats["accepted_length_histogram"],
        "rounds": stats["rounds"],
        "tokens_per_s": stats["tokens_per_s"],
        "peak_memory_bytes": peak,
        "fallback": stats["fallback"],
        "fallback_reason": stats["fallback_reason"],
        "stage_ms": stats["stage_ms"],
    }


def run_assisted(
    target, drafter, target_inputs, max_new_tokens, attention: str
) -> tuple[torch.Tensor, float]:
    device = target_inputs["input_ids"].device
    target.set_attn_implementation({"text_config": attention})
    prompt = target_inputs["input_ids"].shape[1]
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        output = target.generate(
            **target_inputs, do_sample=False, max_new_tokens=max_new_tokens, assistant_model=drafter
        )
    _sync(device)
    return output[:, prompt:].cpu(), (time.perf_counter() - start) * 1e3


def probe_assisted(target, drafter, target_inputs, attention: str) -> str | None:
    """None if HF assisted generation runs with this drafter, else why it cannot (its real error)."""
    try:
        run_assisted(target, drafter, target_inputs, 2, attention)
    except Exception as error:  # HF raises ValueError/TypeError/RuntimeError for unusable assistants
        first_line = (str(error).strip().splitlines() or [""])[0]
        return (
            "target.generate(assistant_model=drafter) hands the assistant the target's own inputs "
            "(input_ids with video placeholders, pixel_values_videos); the event drafter reads its "
            f"own prompt and event frames, so HF cannot run it: {type(error).__name__}: {first_line}"
        )
    return None


def first_difference(left: torch.Tensor, right: torch.Tensor) -> int | None:
    if torch.equal(left, right):
        return None
    common = min(left.shape[1], right.shape[1])
    differ = (left[0, :common] != right[0, :common]).nonzero()
    return int(differ[0]) if len(differ) else common


def measure_sample(models, draftings, request, sample, max_new_tokens: int, settings, memory, assisted: bool):
    """One record per drafting: ``target.generate`` once, then the engine with each drafting."""
    target, drafter, attention = models
    target_inputs = request[0]
    baseline = run_baseline(target, target_inputs, max_new_tokens, memory, attention)
    baseline_tokens = baseline.pop("tokens")
    shared = {
        "id": sample.id,
        "line": sample.line,
        "max_new_tokens": max_new_tokens,
        "new_tokens": int(baseline_tokens.shape[1]),
        "num_events": request[2],
        "baseline": baseline,
        "assisted": None,
    }
    if assisted:
        tokens, total_ms = run_assisted(target, drafter, target_inputs, max_new_tokens, attention)
        shared["assisted"] = {
            "total_ms": total_ms,
            "speedup": baseline["total_ms"] / total_ms,
            "identical": torch.equal(tokens, baseline_tokens),
        }
    records = []
    for drafting in draftings:
        engine = run_engine(drafting, models, request, max_new_tokens, settings, memory)
        difference = first_difference(engine.pop("tokens"), baseline_tokens)
        records.append(
            {
                **shared,
                "drafting": drafting.name,
                "identical": difference is None,
                "first_difference": difference,
                "engine": engine,
                "speedup": baseline["total_ms"] / engine["total_ms"],
            }
        )
    return records


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import transformers

    import crossspec_kernels

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "crossspec_kernels": crossspec_kernels.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }


def run_benchmark(samples, lengths: list[int], settings: dict, device: torch.device, *, show_progress=True):
    """The whole run as a JSON-ready dict (see the module docstring)."""
    from crossspec_kernels.adapter_tools._progress import progress
    from crossspec_kernels.benchmark.summary import aggregate

    target, drafter = build_tiny_models(settings["seed"], settings["event_layout"], device)
    draftings = load_draftings(settings["adapters"], target, drafter, settings)
    attention = target.config.get_text_config()._attn_implementation
    models = (target, drafter, attention)
    requests = [make_request(sample, drafter.config, device) for sample in samples]
    memory = PeakMemory(device)
    for _ in range(settings["warmup"]):  # first calls pay for lazy initialisation: not timed
        measure_sample(models, draftings, requests[0], samples[0], min(lengths), settings, memory, False)
    assisted_reason = probe_assisted(target, drafter, requests[0][0], attention)
    records = []
    bar = progress(
        total=len(lengths) * len(samples), desc="bench e2e", unit="sample", disable=not show_progress
    )
    for length in lengths:
        for sample, request in zip(samples, requests):
            for record in measure_sample(
                models, draftings, request, sample, length, settings, memory, assisted_reason is None
            ):
                if not record["identical"]:
                    print(
                        f"MISMATCH: sample {sample.id} (line {sample.line}), max_new_tokens {length}, "
                        f"{record['drafting']}: the engine's tokens differ from target.generate's at token "
                        f"{record['first_difference']}",
                        file=sys.stderr,
                    )
                records.append(record)
            bar.update(1)
    bar.close()
    config = drafter.config
    return {
        "benchmark": "crossspec bench e2e",
        "environment": environment(device),
        "settings": {
            **settings,
            "models": _MODELS,
            "draftings": [drafting.name for drafting in draftings],
            "draft": f"chain gamma={settings['gamma']}",
            "event_token_layout": (
                f"{settings['event_layout']} ({config.num_event_tokens} event tokens: "
                f"{'N + P' if settings['event_layout'] == 'original' else 'N*P + N + P'}, "
                f"N={config.num_frames} frames, P={config.tokens_per_frame} tokens per frame)"
            ),
            "end_of_sequence": "disabled: every answer runs max_new_tokens tokens",
            "max_new_tokens": lengths,
            "peak_memory": memory.kind,
            "timed_runs_per_sample": 1,
        },
        "assisted": {"available": assisted_reason is None, "reason": assisted_reason},
        "identical_all": all(record["identical"] for record in records),
        "samples": records,
        "aggregates": {  # drafting -> answer length -> summary
            drafting.name: {
                str(length): aggregate(
                    [r for r in records if r["max_new_tokens"] == length and r["drafting"] == drafting.name]
                )
                for length in lengths
            }
            for drafting in draftings
        },
    }


def main(argv: list[str] | None = None) -> int:
    from crossspec_kernels.benchmark.cli import add_e2e_arguments, run_e2e
    from crossspec_kernels.cli_common import EXIT_CODES_HELP, HelpFormatter

    parser = argparse.ArgumentParser(
        prog="python -m crossspec_kernels.benchmark.e2e",
        description=__doc__.split("\n\n")[0],
        epilog=EXIT_CODES_HELP,
        formatter_class=HelpFormatter,
    )
    add_e2e_arguments(parser)
    return run_e2e(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
