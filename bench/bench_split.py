"""The edge–cloud split (``serving.split``) against the target alone, versus injected network delay.

Run from the repository root (both actors on this machine, one torch thread each):

    OMP_NUM_THREADS=1 python bench/bench_split.py --out bench/results/cpu-split.json [--quick]

Per case, greedy, batch 1, end-of-sequence stopping off (every variant makes ``--max-new-tokens``):

* ``target_alone``: ``target.generate(do_sample=False)`` in this process: the cloud-only run's
  compute, and the reference tokens. Cloud-only latency at round-trip time r is modelled as
  ``T_target + r`` (the request's one-way trip up, the answer's one-way trip down), plus uploading
  the request: ``request_bytes`` (the target's inputs: prompt ids, mask and the preprocessed video
  tensor) — the split uploads the same target inputs once, so the upload time cancels out of the
  comparison and is reported in bytes, not seconds (no bandwidth is assumed).
* ``engine_one_device``: ``CrossSpecEngine.generate`` with both models in this process (context).

Each repeat runs the variants in turn (target alone, engine at the first RTT, split), so all of them
see the same load on a shared machine; the first repeat of each is a warm-up.
* ``split``: ``SplitGenerator`` (an EdgeDrafter and a CloudVerifier Ray actor) at each injected
  RTT of ``--rtts``: end-to-end latency at the edge, rounds, bytes per round in each direction.

The split's output is checked against ``target.generate`` before anything is timed. Break-even RTT:
a least-squares line through the split's median latencies, ``split(r) = a + b·r`` (b ≈ rounds: one
round trip per round), against ``T_target + r``: ``r* = (T_target - a) / (b - 1)``; below r* the
split is faster. ``r* < 0`` (the split is slower even at RTT 0) is reported as "never".

Cases:

* ``tiny``: ``bench/models.py``'s tiny preset (tiny Video-LLaVA target, EventGPT-tiny drafter whose LM
  copies the target's, reading the event frames): natural acceptance of tiny random models. Its
  target is as cheap as its drafter, so this shows what the actors and the rounds cost.
* ``small``: the same prompt and clip, a wider and deeper target language model (hidden 512, 8
  layers; vision tower as tiny), the EventGPT-tiny drafter behind a random linear adapter 64 -> 512,
  and controlled acceptance (``runtime.controlled``, ``--alpha``): each draft is the target's own
  token with probability alpha, so the acceptance is chosen while every step's cost stays real.

On CPU this is a smoke test of the mechanism: the times are those of this CPU (shared with other
work), not of an edge device and a GPU server.
"""

from __future__ import annotations

import math
import os

import _common as harness
import torch
from models import SEED, Setup, _eventgpt_spec, tiny_request, tiny_setup, use_native_attention

from crossspec_kernels import hf_attention
from crossspec_kernels import testing_models as tm
from crossspec_kernels.models.eventgpt import eventgpt_config
from crossspec_kernels.runtime import ChainDraft, ControlledAcceptance, CrossSpecEngine
from crossspec_kernels.serving.split import SplitGenerator, round_bytes, tensor_bytes

OP = "split"
CASES = ("tiny", "small")
# Video-LLaVA-7B's request, for the bytes a real deployment would move (formula, not measured).
VIDEO_LLAVA_7B = dict(vocab=32064, frames=8, image_size=224, shared_vocab=32000)


def parse_args(argv=None):
    parser = harness.script_arg_parser(OP, __doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=harness.name_list, default=list(CASES), help="tiny,small")
    parser.add_argument("--rtts", type=harness.int_list, default=[0, 5, 20, 50], help="injected RTTs in ms")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--gamma", type=int, default=4, help="ChainDraft gamma")
    parser.add_argument("--free-token-budget", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.8, help="small case: controlled acceptance")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant and RTT")
    args = parser.parse_args(argv)
    if any(case not in CASES for case in args.cases):
        parser.error(f"--cases: choose from {','.join(CASES)}, got {','.join(args.cases)}")
    if not args.rtts or any(rtt < 0 for rtt in args.rtts):
        parser.error(f"--rtts must be milliseconds >= 0, got {args.rtts}")
    for name, least in (("max_new_tokens", 2), ("gamma", 1), ("free_token_budget", 1), ("repeats", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return args


def small_setup(device: torch.device) -> Setup:
    """The tiny preset's prompt and clip with a heavier target LM and an adapted EventGPT-tiny drafter."""
    dtype = torch.float32
    text = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8)
    target = tm.tiny_video_llava(seed=SEED, attn_implementation="sdpa", head_dim=64, **text)
    target.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    target = target.to(device)
    target_inputs, before, question, events = tiny_request(device, dtype)
    ids = target_inputs["input_ids"]
    spec = _eventgpt_spec(
        "eventgpt-tiny",
        eventgpt_config("tiny"),
        target,
        before,
        question,
        events,
        device,
        dtype,
        SEED + 7,
        copy_lm=False,
    )
    details = dict(
        target="tiny Video-LLaVA vision tower + Llama LM hidden 512, 8 layers, 8 heads x 64, intermediate 1408 "
        f"(random fp32, {sum(p.numel() for p in target.parameters()) / 1e6:.1f} M parameters)",
        prompt_tokens=int(ids.shape[1]),
    )
    return Setup("small", dtype, target, target_inputs, [spec], details)


def _median(values):
    return harness.quantiles(values)


def break_even(rtts: list[int], split_ms: list[float], target_ms: float) -> dict:
    """Least-squares split(r) = a + b r against cloud-only T_target + r."""
    mean_r, mean_t = sum(rtts) / len(rtts), sum(split_ms) / len(split_ms)
    var = sum((r - mean_r) ** 2 for r in rtts)
    slope = sum((r - mean_r) * (t - mean_t) for r, t in zip(rtts, split_ms)) / var if var else math.nan
    intercept = mean_t - slope * mean_r
    rtt = (target_ms - intercept) / (slope - 1) if slope > 1 else math.inf
    return dict(
        split_intercept_ms=intercept,
        split_ms_per_rtt_ms=slope,
        cloud_only_model="target_alone_ms + rtt_ms",
        break_even_rtt_ms=rtt if rtt >= 0 else None,
        verdict=(
            f"the split is faster below an RTT of {rtt:.1f} ms"
            if rtt >= 0
            else "never: the split is slower than the target alone even at RTT 0"
        ),
    )


def run_case(name: str, args, device) -> tuple[dict, list[str]]:
    torch.manual_seed(SEED)
    setup = tiny_setup(device) if name == "tiny" else small_setup(device)
    spec = setup.drafters[0]
    drafter, adapter, drafter_inputs = spec.build()
    target, target_inputs, new_tokens = setup.target, setup.target_inputs, args.max_new_tokens
    problems = []

    reference = harness.timed_generate(target, target_inputs, new_tokens, device)["tokens"]  # + warm-up

    controlled = None
    if name == "small":
        longer = target.generate(**target_inputs, max_new_tokens=new_tokens + args.gamma + 2, do_sample=False)
        controlled = longer[:, target_inputs["input_ids"].shape[1] :]
    knobs = dict(draft=ChainDraft(args.gamma), free_token_budget=args.free_token_budget)

    def control():
        return None if controlled is None else ControlledAcceptance(controlled, args.alpha, seed=SEED)

    engine = CrossSpecEngine(target, drafter, adapter, **knobs)

    def run_target() -> float:
        use_native_attention(target)  # HF's own attention for the baseline (the engine switches it)
        return harness.timed_generate(target, target_inputs, new_tokens, device)["total_ms"]

    def run_engine():
        hf_attention.enable(target)
        return harness.timed_engine(
            engine, target_inputs, drafter_inputs, new_tokens, device, controlled_acceptance=control()
        )

    split = SplitGenerator(target, drafter, adapter, num_threads=1, **knobs)
    rows, target_runs, engine_runs = [], [], []
    try:
        for rtt in args.rtts:
            split.set_rtt(float(rtt))
            outs, alone = [], []
            for _ in range(args.repeats + 1):  # interleaved: every variant sees the same load
                alone.append(run_target())
                if rtt == args.rtts[0]:
                    engine_runs.append(run_engine())
                out = split.generate(
                    target_inputs,
                    drafter_inputs,
                    max_new_tokens=new_tokens,
                    eos_token_id=[],
                    controlled_acceptance=control(),
                )
                outs.append(out)
            alone_ms = _median(alone[1:])
            target_runs += alone[1:]
            same = all(torch.equal(out.sequences.cpu(), reference) for out in outs)
            if not same:
                problems.append(f"{name} split rtt={rtt}: tokens differ from target.generate")
            timed = outs[1:]
            stats = [out.stats for out in timed]
            up = stats[0]["bytes"]["edge_to_cloud_per_round"]
            down = stats[0]["bytes"]["cloud_to_edge_per_round"]
            drafts = [stats[0]["first_round_drafts"]] + [args.gamma] * (stats[0]["rounds"] - 1)
            formula_ok = up == [round_bytes(1, n)[0] for n in drafts] and down == [
                round_bytes(1, 0)[1]
            ] * len(down)
            if not formula_ok:
                problems.append(f"{name} split rtt={rtt}: counted bytes differ from round_bytes")
            total = _median([s["total_ms"] for s in stats])
            row = dict(
                rtt_ms=rtt,
                tokens_identical=same,
                total_ms=total,
                ttft_ms=_median([s["ttft_ms"] for s in stats]),
                rounds=harness.median([s["rounds"] for s in stats]),
                acceptance_rate=harness.median([s["acceptance_rate"] for s in stats]),
                first_round_drafts=harness.median([s["first_round_drafts"] for s in stats]),
                verify_ms_per_round=harness.median([harness.median(s["verify_ms"]) for s in stats]),
                edge_to_cloud_bytes_per_round=up,
                cloud_to_edge_bytes_per_round=down,
                edge_to_cloud_bytes=sum(up),
                cloud_to_edge_bytes=sum(down),
                bytes_match_formula=formula_ok,
                target_alone_ms=alone_ms,
                cloud_only_ms=alone_ms["median"] + rtt,
                speedup_vs_cloud_only=(alone_ms["median"] + rtt) / total["median"],
            )
            rows.append(row)
            print(
                f"[{name}] split rtt {rtt:>3} ms: {total['median']:7.1f} ms, {row['rounds']:.0f} rounds, "
                f"{sum(up)} B up / {sum(down)} B down; cloud-only {row['cloud_only_ms']:.1f} ms",
                flush=True,
            )
    finally:
        split.close()

    engine_runs = engine_runs[1:]
    engine_row = dict(
        total_ms=_median([run["total_ms"] for run in engine_runs]),
        acceptance_rate=harness.median([run["stats"]["acceptance_rate"] for run in engine_runs]),
        rounds=harness.median([run["stats"]["rounds"] for run in engine_runs]),
    )
    problems += harness.check_tokens(engine_row, engine_runs, reference, setup.dtype, f"{name} engine")
    target_ms = _median(target_runs)
    print(f"[{name}] target alone {target_ms['median']:.1f} ms, engine on one device ", end="")
    print(f"{engine_row['total_ms']['median']:.1f} ms for {new_tokens} tokens", flush=True)
    request = tensor_bytes(target_inputs)
    video = target_inputs["pixel_values_videos"]
    result = dict(
        case=name,
        models=dict(setup.details, drafter=spec.description),
        acceptance=(
            f"controlled, alpha={args.alpha}" if controlled is not None else "natural (tiny random models)"
        ),
        target_alone=dict(total_ms=target_ms, tokens=new_tokens, runs="all, interleaved with the split's"),
        engine_one_device=engine_row,
        split=rows,
        break_even=break_even(args.rtts, [row["total_ms"]["median"] for row in rows], target_ms["median"]),
        upload=dict(
            request_bytes=request,
            video_tensor_bytes=video.numel() * video.element_size(),
            video_tensor=f"{tuple(video.shape)} {str(video.dtype).replace('torch.', '')}",
            events_input_bytes=tensor_bytes(drafter_inputs),
            note="cloud-only and split both upload the target's inputs once per request; the events "
            "(drafter inputs) stay on the edge in the split",
        ),
    )
    print(f"[{name}] break-even: {result['break_even']['verdict']}", flush=True)
    return result, problems


def seven_b_bytes(gamma: int) -> dict:
    """The formula at Video-LLaVA-7B's shapes, batch 1 (what a real deployment would move)."""
    shape = VIDEO_LLAVA_7B
    greedy_up, down = round_bytes(1, gamma)
    rejection_up, _ = round_bytes(1, gamma, shape["shared_vocab"])
    video_fp32 = shape["frames"] * 3 * shape["image_size"] ** 2 * 4
    return dict(
        gamma=gamma,
        edge_to_cloud_per_round_greedy_or_coupled=greedy_up,
        edge_to_cloud_per_round_rejection=rejection_up,
        cloud_to_edge_per_round=down,
        video_upload_fp32_bytes=video_fp32,
        video_upload_uint8_bytes=video_fp32 // 4,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    device, smoke, info = harness.start_run(args)
    device = torch.device("cpu")  # the split's actors run where Ray puts them: here, on this CPU
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 * 1024)
    cases, problems = [], []
    try:
        for name in args.cases:
            result, found = run_case(name, args, device)
            cases.append(result)
            problems += found
    finally:
        ray.shutdown()

    table = [
        dict(
            case=case["case"],
            rtt_ms=row["rtt_ms"],
            split_ms=row["total_ms"]["median"],
            cloud_ms=row["cloud_only_ms"],
            speedup=row["speedup_vs_cloud_only"],
            rounds=row["rounds"],
            up=row["edge_to_cloud_bytes"],
            down=row["cloud_to_edge_bytes"],
        )
        for case in cases
        for row in case["split"]
    ]
    columns = (
        ("case", "case", ""),
        ("rtt_ms", "RTT ms", "d"),
        ("split_ms", "split ms", ".1f"),
        ("cloud_ms", "cloud-only ms", ".1f"),
        ("speedup", "split speedup", ".2f"),
        ("rounds", "rounds", ".0f"),
        ("up", "B edge->cloud", "d"),
        ("down", "B cloud->edge", "d"),
    )
    print()
    print(harness.format_table(table, columns))
    for case in cases:
        print(f"{case['case']}: break-even {case['break_even']['verdict']}")
    rows = [dict(row, case=case["case"]) for case in cases for row in case["split"]]
    payload = harness.results_payload(
        OP,
        smoke,
        info,
        ["target_alone", "engine_one_device", "split"],
        [],
        rows,
        problems,
        request=dict(
            batch=1,
            max_new_tokens=args.max_new_tokens,
            gamma=args.gamma,
            free_token_budget=args.free_token_budget,
            repeats=args.repeats,
            rtts_ms=args.rtts,
            greedy=True,
            torch_threads_per_actor=1,
        ),
        byte_formula=dict(
            edge_to_cloud_per_round="4*B*N (int32 draft ids; N = the round's drafts) "
            "+ 4*B*N*V_shared with sampling='rejection' (fp32 draft probabilities)",
            cloud_to_edge_per_round="5*B (uint8 accepted count + int32 correction/bonus token per row)",
            once_per_request="the target's inputs edge -> cloud (request_bytes); the prefill's ack carries nothing",
            at_video_llava_7b=seven_b_bytes(args.gamma),
        ),
        cases=cases,
    )
    if smoke:
        print(harness.SMOKE_BANNER)
    return harness.finish_run(OP, args.out, smoke, info, payload, problems)


if __name__ == "__main__":
    raise SystemExit(main())
