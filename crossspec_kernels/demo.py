"""``crossspec demo``: the whole pipeline on tiny random models, in under a minute on a CPU.

1. A tiny random Video-LLaVA target and a tiny EventGPT-style drafter. As EventGPT-7B and
   Video-LLaVA-7B both start from Vicuna-7B, the drafter's language model is a copy of the target's;
   its event encoder (CLIP tower, projector, feature adaptor) is its own.
2. Synthetic clips: moving objects rendered as video frames and as the event stream a camera would
   see (crossspec_kernels.events.synthetic_clip); events rasterized into 5 EventGPT frames
   (crossspec_kernels.events_to_frames).
3. Adapter training: (drafter hidden, target next token) pairs extracted on training clips
   (crossspec_kernels.adapter_tools), a linear adapter trained on them.
4. Held-out clips answered by target.generate and by CrossSpecEngine (chain and tree drafts,
   without and with the adapter): identical tokens, acceptance, free tokens, per-stage times.

Tiny random models produce meaningless text: the demo checks the machinery (losslessness, the
adapter's effect on acceptance, prefill hiding), and CPU timings are not speed claims.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from crossspec_kernels.cli_common import (
    EXIT_OK,
    EXIT_OUTPUTS_DIFFER,
    UsageError,
    add_command,
    int_at_least,
    output_file,
)

# torch and the models are imported inside the functions: `crossspec --help` imports this module
# for its parser.
# Sizes of the demo (small enough for a CPU in well under a minute).
SENSOR = (48, 64)  # event camera / video height, width
CLIP_US = 250_000
EVENT_RATE = 400_000.0  # events per second
NEW_TOKENS = 24


def build_models(device, seed: int):
    """(target, drafter): the drafter's LLM starts as a copy of the target's."""
    import torch

    from crossspec_kernels.models.eventgpt import EventGPTForCausalLM, eventgpt_config
    from crossspec_kernels.testing_models import tiny_video_llava

    target = tiny_video_llava(seed=seed)
    torch.manual_seed(seed + 1)
    drafter = EventGPTForCausalLM(eventgpt_config("tiny")).eval()
    drafter.model.language_model.load_state_dict(target.model.language_model.state_dict())
    drafter.lm_head.load_state_dict(target.lm_head.state_dict())
    return target.to(device), drafter.to(device)


def make_request(
    drafter_config, clip_seed: int, device, *, question=None, backend: str | None = None
) -> tuple[dict, dict, int]:
    """One request: (target inputs, drafter inputs, number of events) for a synthetic clip.

    ``question``: [L] token ids (default: random ids drawn from ``clip_seed``); ``backend``:
    events_to_frames' backend (None: its default for the device)."""
    import torch

    from crossspec_kernels import events_to_frames
    from crossspec_kernels.events import synthetic_clip
    from crossspec_kernels.testing_models import NUM_FRAMES

    events, video = synthetic_clip(
        num_frames=NUM_FRAMES,
        height=SENSOR[0],
        width=SENSOR[1],
        duration_us=CLIP_US,
        events_per_second=EVENT_RATE,
        seed=clip_seed,
        num_objects=3,
    )
    frames = events_to_frames(
        events.x,
        events.y,
        events.t,
        events.p,
        sensor_size=events.sensor_size,
        representation="eventgpt",
        backend=backend,
    )
    if question is None:
        gen = torch.Generator().manual_seed(clip_seed)
        question = torch.randint(3, 100, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen)
    return (*tiny_inputs(video, frames, question, drafter_config, device), len(events))


def tiny_inputs(video, event_frames, question, drafter_config, device) -> tuple[dict, dict]:
    """(target inputs, drafter inputs) of the tiny models for one clip: ``video`` [T, 3, H, W] frames,
    ``event_frames`` the EventGPT raster, ``question`` [L] token ids (no tokenizer at this size)."""
    import torch

    from crossspec_kernels.models.eventgpt import EventGPTPromptBuilder, preprocess_event_frames
    from crossspec_kernels.testing_models import IMAGE_SIZE, VIDEO_TOKEN_ID, VIDEO_TOKENS

    bos = torch.tensor([1])
    target_ids = torch.cat([bos, torch.full((VIDEO_TOKENS,), VIDEO_TOKEN_ID), question])[None]
    target_inputs = {
        "input_ids": target_ids,
        "attention_mask": torch.ones_like(target_ids),
        "pixel_values_videos": preprocess_event_frames(video, IMAGE_SIZE)[None],
    }
    drafter_ids = EventGPTPromptBuilder(drafter_config)(question)[None]
    image_size = drafter_config.vision_config.image_size
    drafter_inputs = {
        "input_ids": drafter_ids,
        "attention_mask": torch.ones_like(drafter_ids),
        "event_pixel_values": preprocess_event_frames(event_frames, image_size)[None],
    }
    on = lambda inputs: {key: value.to(device) for key, value in inputs.items()}
    return on(target_inputs), on(drafter_inputs)


def left_pad_batch(requests: list[dict]) -> dict:
    """Stack single requests into one left-padded batch (pixel tensors are stacked as they are)."""
    import torch

    width = max(r["input_ids"].shape[1] for r in requests)
    batch = {}
    for key in requests[0]:
        if key in ("input_ids", "attention_mask"):
            rows = [torch.nn.functional.pad(r[key], (width - r[key].shape[1], 0)) for r in requests]
        else:
            rows = [r[key] for r in requests]
        batch[key] = torch.cat(rows)
    return batch


def train_adapter_on(target, drafter, train_requests, workdir: Path, epochs: int, seed: int):
    """Extract pairs on the training clips, train a linear adapter.

    Returns (adapter, number of pairs, the best epoch's record, the identity's top-1 agreement on
    the same held-out pairs, seconds)."""
    import torch

    from crossspec_kernels.adapter_tools.data import load_lm_head, load_pairs, split_records
    from crossspec_kernels.adapter_tools.evaluate import evaluate_adapter
    from crossspec_kernels.adapter_tools.extract import extract_pairs, write_manifest
    from crossspec_kernels.adapter_tools.train import TrainConfig, train_adapter
    from crossspec_kernels.models.adapters import AdapterConfig, LinearAdapter, load_adapter

    start = time.perf_counter()
    cpu = lambda inputs: {key: value.cpu() for key, value in inputs.items()}
    manifest = write_manifest(
        workdir / "manifest.jsonl",
        [
            (cpu(drafter_inputs), cpu(target_inputs), f"clip {n}")
            for n, (target_inputs, drafter_inputs) in enumerate(train_requests)
        ],
    )
    device = next(target.parameters()).device
    index = extract_pairs(
        drafter, target, manifest, workdir / "pairs", num_new_tokens=16, device=device, show_progress=False
    )
    config = TrainConfig(
        adapter={"kind": "linear"}, epochs=epochs, batch_size=64, lr=1e-3, eval_fraction=0.2, seed=seed
    )
    result = train_adapter(workdir / "pairs", workdir / "adapter", config, show_progress=False)
    adapter = load_adapter(result["best_dir"]).to(device).eval()
    num_pairs = sum(shard["num_pairs"] for shard in index["shards"])
    # The identity map (adapter=None) on the same held-out pairs, for comparison.
    pairs = load_pairs(workdir / "pairs")
    _, held_out = split_records(pairs, config.eval_fraction, config.seed)
    identity = LinearAdapter(
        AdapterConfig(kind="linear", d_draft=pairs.d_draft, d_target=pairs.d_draft, bias=False)
    )
    with torch.no_grad():
        identity.linear.weight.copy_(torch.eye(pairs.d_draft))
    identity_top1 = evaluate_adapter(identity, held_out, load_lm_head(workdir / "pairs"))["top1"]
    return adapter, num_pairs, result["best"], identity_top1, time.perf_counter() - start


def run_demo(args: argparse.Namespace) -> int:
    device, backends = check_demo_args(args)  # before the models are built
    import torch

    from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine, TreeDraft

    backend = None if args.backend == "auto" else args.backend
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    print("crossspec demo: cross-modal speculative decoding, end to end, on TINY RANDOM models.")
    print("The generated text is meaningless and timings on a CPU are not speed claims; what the demo")
    print("shows: outputs identical to target.generate, acceptance with and without a trained adapter,")
    print(f"drafts made while the target prefills (free tokens). device={device}, seed={args.seed}")
    print(
        f"kernel backends (--backend {args.backend}): " + ", ".join(f"{op} {b}" for op, b in backends.items())
    )
    print()

    target, drafter = build_models(device, args.seed)
    requests = [
        make_request(drafter.config, args.seed * 1000 + n, device) for n in range(args.train_clips + 4)
    ]
    train = [(t, d) for t, d, _ in requests[: args.train_clips]]
    held_out = requests[args.train_clips :]
    events = sum(n for _, _, n in requests) / len(requests)
    print(
        f"clips: {len(requests)} synthetic {SENSOR[0]}x{SENSOR[1]} clips of {CLIP_US / 1000:.0f} ms, "
        f"~{events:,.0f} events each -> 5 EventGPT frames (drafter) | 8 video frames (target)"
    )

    with tempfile.TemporaryDirectory(prefix="crossspec-demo-") as workdir:
        adapter, num_pairs, best, identity_top1, seconds = train_adapter_on(
            target, drafter, train, Path(workdir), args.epochs, args.seed
        )
    print(
        f"adapter: linear {adapter.config.d_draft}->{adapter.config.d_target}, trained on {num_pairs} pairs "
        f"from {args.train_clips} clips, {args.epochs} epochs ({seconds:.1f} s). Top-1 agreement with the "
        f"target on pairs held out of training: {best['eval_top1']:.2f} trained (best epoch {best['epoch']}), "
        f"{identity_top1:.2f} without adapter\n"
    )

    target_inputs = left_pad_batch([t for t, _, _ in held_out])
    drafter_inputs = left_pad_batch([d for _, d, _ in held_out])
    prompt = target_inputs["input_ids"].shape[1]
    # Target LLM forward passes, counted for the baseline and every engine run alike.
    forwards = [0]
    counter = target.get_decoder().register_forward_pre_hook(
        lambda *_: forwards.__setitem__(0, forwards[0] + 1)
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        reference = target.generate(**target_inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, prompt:]
    reference_ms = (time.perf_counter() - t0) * 1e3
    reference_forwards = forwards[0]

    runs = [
        ("chain gamma=4, no adapter", ChainDraft(4), None),
        ("chain gamma=4, adapter", ChainDraft(4), adapter),
        ("tree 3x4 <=16, adapter", TreeDraft(top_k=3, depth=4, max_nodes=16), adapter),
    ]
    results = []
    for title, draft, run_adapter in runs:
        engine = CrossSpecEngine(target, drafter, run_adapter, draft=draft, backend=backend)
        forwards[0] = 0
        out = engine.generate(target_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
        results.append(
            (title, torch.equal(out.sequences, reference), {**out.stats, "target_forwards": forwards[0]})
        )
    counter.remove()

    print(f"held-out batch: {len(held_out)} requests (left padded), {NEW_TOKENS} new tokens each, greedy")
    header = (
        f"{'run':<28} {'identical':>9} {'accept':>7} {'acc/round':>9} {'free':>5} {'rounds':>6} "
        f"{'target fwd':>10} {'TTFT ms':>8} {'total ms':>9}"
    )
    print(header)
    print("-" * len(header))
    # target.generate's rounds are its decode steps: one target forward each.
    print(
        f"{'target.generate':<28} {'-':>9} {'-':>7} {'-':>9} {'-':>5} {reference_forwards:>6} "
        f"{reference_forwards:>10} {'-':>8} {reference_ms:>9.0f}"
    )
    for title, same, stats in results:
        print(
            f"{title:<28} {'yes' if same else 'NO':>9} {stats['acceptance_rate']:>7.2f} "
            f"{stats['mean_accepted_length']:>9.2f} {stats['free_tokens']:>5} {stats['rounds']:>6} "
            f"{stats['target_forwards']:>10} {stats['ttft_ms']:>8.0f} {stats['total_ms']:>9.0f}"
        )
    stages = results[-1][2]["stage_ms"]
    print(f"\nper-stage ms ({results[-1][0]}): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    print(
        "accept = accepted drafts / drafted depth; acc/round = drafts accepted per round and request "
        "(each round also commits one target token); free = drafts finished while the target prefilled\n"
        "(it depends on thread timing, so it varies between identical runs); target fwd = measured forward\n"
        "passes of the target's language model (prefill included)."
    )
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    if args.json:
        payload = {
            "device": str(device),
            "backends": backends,
            "reference_target_forwards": reference_forwards,
            "adapter_top1_held_out": {"trained": best["eval_top1"], "identity": identity_top1},
            "reference_ms": reference_ms,
            "runs": [{"run": title, "identical": same, "stats": stats} for title, same, stats in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return EXIT_OK if all(same for _, same, _ in results) else EXIT_OUTPUTS_DIFFER


def add_demo_parser(sub) -> None:
    demo = add_command(sub, "demo", help="the engine end to end on tiny random models (CPU < 1 min)")
    demo.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    demo.add_argument("--seed", type=int, default=0, help="seed of models, clips and sampling")
    demo.add_argument("--train-clips", type=int_at_least(2), default=32, help="clips for adapter training")
    demo.add_argument("--epochs", type=int_at_least(1), default=20, help="adapter training epochs")
    demo.add_argument(
        "--backend",
        choices=("auto", "cuda", "triton", "reference"),
        default="auto",
        help="force the kernels' backend (auto: each op picks from the device)",
    )
    demo.add_argument("--json", default=None, help="also write the results to this JSON file")
    demo.set_defaults(func=run_demo)


# The ops the engine runs, each with the backend it would pick; a forced --backend must suit all.
_DEMO_OPS = ("verify", "tree_attention", "lm_head_topk")


def check_demo_args(args: argparse.Namespace) -> tuple[object, dict[str, str]]:
    """(device, {op: backend}) once every flag is known to work here; a UsageError (exit 2) otherwise."""
    try:
        if args.json:
            output_file(args.json, "--json")
        from crossspec_kernels.generate_cli import resolve_device

        device = resolve_device(args.device)
        import torch

        from crossspec_kernels.ops._dispatch import pick_backend

        backend = None if args.backend == "auto" else args.backend
        backends = {}
        for op in _DEMO_OPS:
            try:
                backends[op] = pick_backend(op, backend, device, torch.float32)
            except (RuntimeError, ValueError) as error:  # the reason it cannot run here
                raise UsageError(f"--backend {args.backend} cannot run on {device} here: {error}") from None
    except UsageError as error:
        print(f"crossspec demo: error: {error}", file=sys.stderr)
        raise
    return device, backends
