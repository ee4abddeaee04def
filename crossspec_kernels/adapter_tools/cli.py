"""``crossspec adapter extract|train|eval``: argument parsers and runners (wired into crossspec.cli).

The parsers import nothing heavy (``--help`` stays fast); each runner checks its flags and files
before it imports torch or loads a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crossspec_kernels.cli_common import (
    EXIT_USAGE,
    UsageError,
    add_command,
    existing_dir,
    float_in,
    int_at_least,
    output_file,
)

ADAPTER_KINDS = ("linear", "bottleneck", "eagle")
# The keys of extract.DTYPES, spelled out because extract imports torch (a test keeps them equal).
DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def load_model(path: str, class_name: str | None = None):
    """A local HF model folder -> model in eval mode (Auto classes tried in order, or ``class_name``)."""
    import transformers

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    if class_name:
        cls = getattr(transformers, class_name, None)
        if cls is None:
            raise ValueError(f"transformers has no class {class_name!r}")
        return cls.from_pretrained(path).eval()
    errors = []
    for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        cls = getattr(transformers, auto, None)
        if cls is None:
            continue
        try:
            return cls.from_pretrained(path).eval()
        except (ValueError, KeyError) as error:
            errors.append(f"{auto}: {error}")
    raise ValueError(f"cannot load a model from {path!r} (pass --*-class): " + "; ".join(errors))


def run_extract(args: argparse.Namespace) -> int:
    from crossspec_kernels.adapter_tools.extract import extract_pairs, read_manifest

    existing_dir(args.drafter, "--drafter")
    existing_dir(args.target, "--target")
    read_manifest(args.manifest)  # every line and the files it names, before minutes of model loading
    drafter = load_model(args.drafter, args.drafter_class).to(args.device)
    target = load_model(args.target, args.target_class).to(args.device)
    index = extract_pairs(
        drafter,
        target,
        args.manifest,
        args.out,
        num_new_tokens=args.num_new_tokens,
        records_per_shard=args.records_per_shard,
        store_target_hidden=args.target_hidden,
        dtype=args.dtype,
        device=args.device,
        max_shards=args.max_shards,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
    )
    pairs = sum(s["num_pairs"] for s in index["shards"])
    state = "complete" if index["complete"] else "incomplete (re-run to resume)"
    print(
        f"extract: {len(index['shards'])}/{index['num_shards']} shards, {pairs} pairs in {args.out}: {state}"
    )
    return 0


def run_train(args: argparse.Namespace) -> int:
    from crossspec_kernels.adapter_tools.train import TrainConfig, train_adapter

    adapter = {"kind": args.kind, "rank": args.rank}
    if args.use_target_hidden:
        adapter["use_target_hidden"] = True
    config = TrainConfig(
        adapter=adapter,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        min_lr_ratio=args.min_lr_ratio,
        smooth_l1_weight=args.smooth_l1_weight,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
    )
    from crossspec_kernels.adapter_tools.data import load_index

    existing_dir(args.pairs, "--pairs")
    load_index(args.pairs)  # a complete extraction, before the target's LM head is loaded
    lm_head = None
    if args.target:
        existing_dir(args.target, "--target")
        lm_head = load_model(args.target, args.target_class).get_output_embeddings().weight.detach()
    result = train_adapter(
        args.pairs,
        args.out,
        config,
        lm_head=lm_head,
        resume=not args.no_resume,
        stop_after_epochs=args.stop_after_epochs,
        show_progress=not args.no_progress,
    )
    best = result["best"]
    if best is not None:
        print(
            f"train: best epoch {best['epoch']} (held-out top1 {best['eval_top1']:.3f}) in {result['best_dir']}"
        )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    existing_dir(args.pairs, "--pairs")
    existing_dir(args.adapter, "--adapter")
    if args.json:
        output_file(args.json, "--json")
    import torch

    from crossspec_kernels.adapter_tools.data import load_lm_head, load_pairs, split_records
    from crossspec_kernels.adapter_tools.evaluate import GAMMAS, evaluate_adapter, format_table, write_json
    from crossspec_kernels.adapter_tools.train import SPLIT_NAME
    from crossspec_kernels.models.adapters import build_adapter, load_adapter

    pairs = load_pairs(args.pairs)
    lm_head = load_lm_head(args.pairs)
    adapter = load_adapter(args.adapter)
    # The held-out split defaults to the one the adapter was trained with (saved beside it).
    split_file = Path(args.adapter) / SPLIT_NAME
    split = json.loads(split_file.read_text()) if split_file.is_file() else {"eval_fraction": 0.1, "seed": 0}
    eval_fraction = split["eval_fraction"] if args.eval_fraction is None else args.eval_fraction
    seed = split["seed"] if args.seed is None else args.seed
    if args.split == "heldout":
        _, pairs = split_records(pairs, eval_fraction, seed)
    results = {"adapter": evaluate_adapter(adapter, pairs, lm_head, gammas=GAMMAS)}
    if args.untrained:
        torch.manual_seed(seed)
        results = {"untrained": evaluate_adapter(build_adapter(adapter.config), pairs, lm_head), **results}
    print(
        f"eval: {args.split} pairs of {args.pairs}; E[L] = expected accepted draft tokens per round, chain gamma"
    )
    print(format_table(results))
    payload = {
        "pairs": str(args.pairs),
        "adapter_dir": str(args.adapter),
        "split": args.split,
        "eval_fraction": eval_fraction if args.split == "heldout" else None,
        "seed": seed,
        "accepted_length_note": "iid: sum_{i<=gamma} top1^i; measured: mean leading run of top-1 agreements "
        "from each position, capped at gamma, over windows inside a record",
        "results": results,
    }
    out = args.json or str(Path(args.adapter) / "eval.json")
    write_json(out, payload)
    print(f"eval: wrote {out}")
    return 0


def add_adapter_parser(sub) -> None:
    """Add ``adapter`` with ``extract``, ``train`` and ``eval`` to a subparsers object."""
    adapter = add_command(sub, "adapter", help="adapter toolchain: extract pairs, train, evaluate")
    commands = adapter.add_subparsers(dest="adapter_command", required=True, metavar="ADAPTER_COMMAND")
    positive = int_at_least(1)
    fraction = float_in(0.0, 1.0)

    ex = add_command(
        commands,
        "extract",
        help="run drafter and target over a manifest; store drafter hidden + target next tokens",
        description='Manifest: JSON lines {"drafter_inputs": x.pt, "target_inputs": y.pt, "prompt": str},\n'
        "paths relative to the manifest; each .pt is a dict of tensors for one request.\n"
        "Output: sharded safetensors + index.json + lm_head.safetensors. Re-running resumes.",
    )
    ex.add_argument("--drafter", required=True, help="drafter model folder (from_pretrained)")
    ex.add_argument("--target", required=True, help="target model folder (from_pretrained)")
    ex.add_argument("--drafter-class", help="transformers class name for the drafter (default: Auto classes)")
    ex.add_argument("--target-class", help="transformers class name for the target (default: Auto classes)")
    ex.add_argument("--manifest", required=True, help="JSON-lines manifest of paired inputs")
    ex.add_argument("--out", required=True, help="output folder for shards and index.json")
    ex.add_argument("--num-new-tokens", type=positive, default=32, help="greedy target tokens per record")
    ex.add_argument("--records-per-shard", type=positive, default=64, help="records per shard file")
    ex.add_argument("--target-hidden", action="store_true", help="also store the target's hidden states")
    ex.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="hidden-state storage dtype")
    ex.add_argument("--device", default="cpu", help="device to run the models on")
    ex.add_argument("--max-shards", type=positive, help="write at most this many new shards, then stop")
    ex.add_argument("--overwrite", action="store_true", help="discard pairs extracted with other settings")
    ex.add_argument("--no-progress", action="store_true", help="no progress bar")
    ex.set_defaults(func=run_adapter, run=run_extract)

    tr = add_command(commands, "train", help="train an adapter on extracted pairs (resumes from --out)")
    tr.add_argument("--pairs", required=True, help="folder written by `adapter extract`")
    tr.add_argument("--out", required=True, help="output folder (best/, last/, checkpoint.pt, history.json)")
    tr.add_argument("--kind", choices=ADAPTER_KINDS, default="bottleneck", help="adapter kind")
    tr.add_argument("--rank", type=positive, default=256, help="bottleneck width r")
    tr.add_argument(
        "--use-target-hidden", action="store_true", help="eagle: also feed the target's last hidden"
    )
    tr.add_argument("--target", help="take the LM head from this target folder instead of the pairs folder")
    tr.add_argument("--target-class", help="transformers class name for --target")
    tr.add_argument("--epochs", type=positive, default=5, help="training epochs")
    tr.add_argument("--batch-size", type=positive, default=256, help="pairs per optimizer step")
    tr.add_argument(
        "--lr", type=float_in(0.0, float("inf"), low_open=True), default=1e-3, help="AdamW peak learning rate"
    )
    tr.add_argument(
        "--weight-decay", type=float_in(0.0, float("inf")), default=0.01, help="AdamW weight decay"
    )
    tr.add_argument("--warmup-ratio", type=fraction, default=0.05, help="fraction of steps in linear warmup")
    tr.add_argument("--min-lr-ratio", type=fraction, default=0.0, help="cosine floor as a fraction of --lr")
    tr.add_argument(
        "--smooth-l1-weight",
        type=float_in(0.0, float("inf")),
        default=0.0,
        help="SmoothL1 to target hidden (needs pairs extracted with --target-hidden)",
    )
    tr.add_argument(
        "--eval-fraction",
        type=float_in(0.0, 1.0, low_open=True, high_open=True),
        default=0.1,
        help="fraction of records held out",
    )
    tr.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and split")
    tr.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    tr.add_argument("--stop-after-epochs", type=positive, help="stop this run after N epochs (resume later)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(func=run_adapter, run=run_train)

    ev = add_command(commands, "eval", help="top-1/top-5 agreement and expected accepted length, gamma 1..8")
    ev.add_argument("--pairs", required=True, help="folder written by `adapter extract`")
    ev.add_argument(
        "--adapter", required=True, help="adapter folder (save_pretrained), e.g. <train out>/best"
    )
    ev.add_argument("--split", choices=("heldout", "all"), default="heldout", help="pairs to score")
    ev.add_argument(
        "--eval-fraction",
        type=float_in(0.0, 1.0, low_open=True, high_open=True),
        help="held-out fraction (default: the adapter's training split)",
    )
    ev.add_argument("--seed", type=int, help="split seed (default: the adapter's training split)")
    ev.add_argument(
        "--untrained", action="store_true", help="also score an untrained adapter of the same config"
    )
    ev.add_argument("--json", help="where to write the results (default <adapter>/eval.json)")
    ev.set_defaults(func=run_adapter, run=run_eval)


def run_adapter(args: argparse.Namespace) -> int:
    """Run a parsed ``adapter`` subcommand; named input errors become a one-line message and exit 2."""
    from crossspec_kernels.adapter_tools.extract import ManifestError, PairDataError

    try:
        return args.run(args)
    except UsageError as error:
        print(f"crossspec adapter {args.adapter_command}: error: {error}", file=sys.stderr)
        raise
    except (ManifestError, PairDataError, FileNotFoundError, ValueError) as error:
        print(f"crossspec adapter {args.adapter_command}: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_USAGE
