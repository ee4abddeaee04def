"""End-to-end benchmark of ``CrossSpecEngine`` against autoregressive and HF assisted generation.

Two ways to run it, from the repository root:

    python bench/bench_e2e.py [--preset tiny|7b] [--out results.json] [--quick]   # table + JSON
    pytest bench/bench_e2e.py                                                   # the CPU smoke test

Every variant runs in the same process, on the same inputs, greedy (temperature 0), batch 1, with
end-of-sequence stopping off, so every variant generates exactly ``--max-new-tokens`` tokens:

* ``ar``: ``target.generate(do_sample=False)``, the autoregressive baseline and the reference tokens.
* ``hf_assisted-<drafter>-g<k>``: ``target.generate(assistant_model=drafter)``, HF assisted
  generation with a fixed chain of k drafts per round (constant schedule, confidence threshold 0), and
  ``hf_assisted-<drafter>-default`` with HF's default assistant settings (20 drafts, confidence
  threshold 0.4). HF's assistant reads the target's own ``input_ids``, so this baseline exists only
  for a drafter that is a plain causal LM sharing the target's vocabulary: the text-only Llama drafter
  (the target's LM shape, reading the prompt with the video placeholders as plain tokens). It is
  recorded as skipped, with the reason, for the EventGPT drafters. HF forwards the target's
  ``pixel_values_videos`` to the assistant, which a text-only Llama rejects, so the Llama drafter is a
  ``LlamaForCausalLM`` subclass whose forward drops the pixel inputs (it would ignore them anyway).
* ``ours-<drafter>-chain<k>`` / ``ours-<drafter>-tree<top_k>x<depth>n<nodes>``: ``CrossSpecEngine`` with
  ``ChainDraft(k)`` for k in ``--gammas`` and ``TreeDraft`` (``--tree``), for every drafter (the
  EventGPT drafters read the event frames; the Llama drafter reads the target's prompt, as HF's does).

Timing: median, p20 and p80 over ``--repeats`` runs after one warm-up run, wall clock around the whole
call with the device synchronised before and after. TTFT: the engine's ``stats["ttft_ms"]``; for the HF
paths the time at which ``generate`` hands the first new token to a streamer (HF copies it to the host
there). HF assisted rounds are counted from the streamer's puts (one per round), which gives its
tokens per round and acceptance. Preprocessing (video resize, events -> frames -> CLIP pixels) is done
once beforehand and is not timed.

Analytic model (per ours variant; medians over repeats; N = new tokens; stage_ms from the engine):

    T_step   = (T_ar_total - TTFT_ar) / (N - 1)           target decode step, from the ar baseline
    E        = tokens committed per round = N / rounds   (stats tokens_per_round; measured acceptance)
    c_verify = (verify.forward + verify.accept + kv.compact) / rounds
    c_draft  = draft.step / rounds   (every drafter step: prefill-time drafting and catch-up included)
    predicted decode speedup = E * T_step / (c_verify + c_draft)            (steady state, no prefill)
    TTFT_pred    = max(TTFT_ar, draft.prefill) + c_verify   (prefill hiding: the drafter's prefill
                   runs under the target's, and the first round verifies the free drafts)
    T_total_pred = TTFT_pred + (N / E - 1) * (c_verify + c_draft)
    predicted speedup = T_ar_total / T_total_pred;   measured speedup = T_ar_total / T_total
    system efficiency = measured speedup / predicted speedup  (= T_total_pred / T_total)
    TTFT efficiency   = TTFT_pred / TTFT

Stage times are summed spans (CUDA events on their streams, perf_counter on CPU), so the model is a
serial sum: efficiency below 1 is the time outside the stages (Python, launches, syncs), above 1 is
overlap between the drafter's and the target's streams.

Presets (``tiny`` on CPU, ``7b`` on a GPU) and their models: ``bench/models.py``. Without a CUDA device
this runs the tiny preset on CPU as a smoke test that claims nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import _common as harness
import torch
from models import ACCEPTANCE_NOTES, DRAFTERS_7B, SEED, DrafterSpec, Setup, setup_for, use_native_attention

from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine, TreeDraft

OP = "e2e"

ANALYTIC_MODEL = {
    "T_step": "(T_ar_total - TTFT_ar) / (N - 1): target decode step, from the autoregressive baseline",
    "E": "tokens committed per round = N / rounds (engine stats tokens_per_round)",
    "c_verify": "(stage_ms verify.forward + verify.accept + kv.compact) / rounds",
    "c_draft": "stage_ms draft.step / rounds (all drafter steps, prefill-time drafting included)",
    "predicted_decode_speedup": "E * T_step / (c_verify + c_draft)  (steady state, prefill excluded)",
    "ttft_pred": "max(TTFT_ar, stage_ms draft.prefill) + c_verify  (prefill hiding)",
    "total_pred": "ttft_pred + (N / E - 1) * (c_verify + c_draft)",
    "predicted_speedup": "T_ar_total / total_pred",
    "measured_speedup": "T_ar_total / T_total (medians)",
    "system_efficiency": "measured_speedup / predicted_speedup",
    "ttft_efficiency": "ttft_pred / TTFT (medians)",
    "caveat": "stage times are summed spans, so this is a serial-sum model: < 1 is time outside the stages "
    "(Python, launches, syncs), > 1 is overlap of the drafter's and target's streams",
}


# ----------------------------------------------------------------------------------------------
# Variants and runs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    kind: str  # "ar" | "hf_assisted" | "ours"
    drafter: str | None = None
    gamma: int | None = None  # chain length (ours ChainDraft, HF num_assistant_tokens); None = HF default
    tree: TreeDraft | None = None

    @property
    def draft(self) -> ChainDraft | TreeDraft | None:
        if self.kind != "ours":
            return None
        return self.tree if self.tree is not None else ChainDraft(self.gamma)

    def __str__(self) -> str:
        if self.kind == "ar":
            return "ar"
        if self.tree is not None:
            shape = f"tree{self.tree.top_k}x{self.tree.depth}n{self.tree.max_nodes}"
        elif self.kind == "hf_assisted":
            shape = "default" if self.gamma is None else f"g{self.gamma}"
        else:
            shape = f"chain{self.gamma}"
        return f"{self.kind}-{self.drafter}-{shape}"


def run_once(variant: Variant, setup: Setup, drafter, adapter, drafter_inputs, args, device) -> dict:
    """One timed call: {"tokens", "total_ms", "ttft_ms", "stats" (ours) or "rounds" (HF)}."""
    n = args.max_new_tokens
    if variant.kind == "ours":
        engine = CrossSpecEngine(
            setup.target,
            drafter,
            adapter,
            draft=variant.draft,
            free_token_budget=args.free_token_budget,
            backend=args.backend,
        )
        return harness.timed_engine(engine, setup.target_inputs, drafter_inputs, n, device)
    use_native_attention(setup.target, drafter)
    assistant = drafter if variant.kind == "hf_assisted" else None
    return harness.timed_generate(
        setup.target, setup.target_inputs, n, device, assistant=assistant, gamma=variant.gamma
    )


def measure(
    variant, setup, drafter, adapter, drafter_inputs, args, device, reference
) -> tuple[dict, list[str]]:
    row = dict(config=str(variant), kind=variant.kind, drafter=variant.drafter, backend=variant.kind)
    if variant.kind == "ours":
        row["draft"] = str(variant.draft)
    elif variant.kind == "hf_assisted":
        row["draft"] = (
            "HF defaults (20 drafts, constant, confidence 0.4)"
            if variant.gamma is None
            else f"{variant.gamma} drafts, constant schedule, confidence threshold 0"
        )
    else:
        row["draft"] = None
    for _ in range(args.warmup):
        run_once(variant, setup, drafter, adapter, drafter_inputs, args, device)
    runs = [
        run_once(variant, setup, drafter, adapter, drafter_inputs, args, device) for _ in range(args.repeats)
    ]
    tokens = runs[0]["tokens"]
    row["new_tokens"] = int(tokens.shape[1])
    problems = []
    if tokens.shape[1] != args.max_new_tokens:
        problems.append(f"{variant}: generated {tokens.shape[1]} tokens, expected {args.max_new_tokens}")
    if any(not torch.equal(run["tokens"], tokens) for run in runs):
        problems.append(f"{variant}: greedy tokens differ between repeats")
    if reference is None:
        row["tokens_identical"] = True  # the reference itself
        row["_tokens"] = tokens
    else:
        problems += harness.check_tokens(row, runs[:1], reference, setup.dtype, str(variant))
    row.update(harness.time_summary(runs, row["new_tokens"]))
    row.update(
        median_us=row["total_ms"]["median"] * 1e3,
        p20_us=row["total_ms"]["p20"] * 1e3,
        p80_us=row["total_ms"]["p80"] * 1e3,
        timing_method=f"wall clock around the call, device synchronised, {args.repeats} repeats after "
        f"{args.warmup} warm-up",
    )
    if variant.kind == "ours":
        stats, found = harness.engine_summary(runs, str(variant))
        row.update(stats)
        problems += found
    elif variant.kind == "hf_assisted":
        rounds = harness.median([run["rounds"] for run in runs])
        per_round = row["new_tokens"] / rounds if rounds else None
        row["rounds"] = rounds
        row["tokens_per_round"] = per_round
        row["mean_accepted_length"] = None if per_round is None else per_round - 1
        row["acceptance_rate"] = (
            None if per_round is None or variant.gamma is None else (per_round - 1) / variant.gamma
        )
        row["round_count_method"] = "generate() streamer puts (one per assisted round)"
    return row, problems


def analytic(row: dict, ar: dict, new_tokens: int) -> dict | None:
    """The analytic model of the module docstring for one ours row (None when it cannot apply)."""
    if row.get("kind") != "ours" or not row.get("rounds") or "total_ms" not in row or new_tokens < 2:
        return None
    ar_total, ar_ttft = ar["total_ms"]["median"], ar["ttft_ms"]["median"]
    stage, rounds = row["stage_ms"], row["rounds"]
    step = (ar_total - ar_ttft) / (new_tokens - 1)
    per_round = new_tokens / rounds
    c_verify = (stage["verify.forward"] + stage["verify.accept"] + stage["kv.compact"]) / rounds
    c_draft = stage["draft.step"] / rounds
    ttft_pred = max(ar_ttft, stage["draft.prefill"]) + c_verify
    total_pred = ttft_pred + (new_tokens / per_round - 1) * (c_verify + c_draft)
    total, ttft = row["total_ms"]["median"], row["ttft_ms"]["median"]
    predicted, measured = ar_total / total_pred, ar_total / total
    return dict(
        T_step_ms=step,
        E_tokens_per_round=per_round,
        c_verify_ms=c_verify,
        c_draft_ms=c_draft,
        predicted_decode_speedup=per_round * step / (c_verify + c_draft) if c_verify + c_draft > 0 else None,
        ttft_pred_ms=ttft_pred,
        total_pred_ms=total_pred,
        predicted_speedup=predicted,
        measured_speedup=measured,
        system_efficiency=measured / predicted,
        ttft_efficiency=ttft_pred / ttft if ttft else None,
    )


def variants_for(spec: DrafterSpec, args) -> list[Variant]:
    found = []
    if spec.hf_assisted:
        found += [Variant("hf_assisted", spec.name, gamma) for gamma in args.gammas]
        if not args.quick:
            found.append(Variant("hf_assisted", spec.name, None))
    found += [Variant("ours", spec.name, gamma) for gamma in args.gammas]
    if args.tree is not None:
        found.append(Variant("ours", spec.name, tree=args.tree))
    return found


# ----------------------------------------------------------------------------------------------
# Script mode
# ----------------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("config", "variant", ""),
    ("ttft_med", "TTFT ms", ".1f"),
    ("total_med", "total ms", ".1f"),
    ("tps_med", "tok/s", ".1f"),
    ("speedup", "x ar", ".2f"),
    ("acceptance_rate", "accept", ".2f"),
    ("mean_accepted_length", "mean acc", ".2f"),
    ("free_tokens", "free", ".0f"),
    ("predicted", "x pred", ".2f"),
    ("efficiency", "sys eff", ".2f"),
    ("identical", "identical", ""),
)


def _table_rows(rows: list[dict]) -> list[dict]:
    shown = []
    for row in rows:
        if row.get("status") == "skipped":
            shown.append(dict(config=row["config"], identical="skipped"))
            continue
        model = row.get("analytic") or {}
        shown.append(
            dict(
                row,
                ttft_med=(row.get("ttft_ms") or {}).get("median"),
                total_med=(row.get("total_ms") or {}).get("median"),
                tps_med=(row.get("tokens_per_s") or {}).get("median"),
                speedup=row.get("speedup_vs_ar"),
                predicted=model.get("predicted_speedup"),
                efficiency=model.get("system_efficiency"),
                identical=str(row.get("tokens_identical", row.get("error", ""))),
            )
        )
    return shown


def _parse_tree(text: str) -> TreeDraft | None:
    if text.lower() in ("", "none", "off"):
        return None
    try:
        top_k, depth, max_nodes = (int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--tree takes TOP_K,DEPTH,MAX_NODES or 'none', got {text!r}"
        ) from error
    return TreeDraft(top_k, depth, max_nodes)


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.e2e_arg_parser(
        OP,
        __doc__.split("\n\n")[0],
        drafters=DRAFTERS_7B,
        defaults=dict(
            preset="tiny: tiny random models (CPU smoke; the default without CUDA); 7b: Video-LLaVA-7B-shaped "
            "target and EventGPT-1B/-7B drafters with random bf16 weights on the GPU (the default with CUDA)",
            drafters="default: all",
            max_new_tokens="default: tiny 16, 7b 128; --quick: 8 / 64",
            repeats="default: tiny 3, 7b 5; --quick: 2 / 3",
            free_token_budget="default 32 (the engine's)",
            free_token_budget_value=32,
        ),
    )
    parser.add_argument(
        "--gammas", type=harness.int_list, default=[3, 5, 8], help="chain lengths, e.g. 3,5,8"
    )
    parser.add_argument(
        "--tree",
        type=_parse_tree,
        default=TreeDraft(4, 5, 32),
        help="TreeDraft TOP_K,DEPTH,MAX_NODES or none (4,5,32)",
    )
    args = parser.parse_args(argv)
    if any(gamma < 1 for gamma in args.gammas):
        parser.error("--gammas must be positive")
    args = harness.check_e2e_args(parser, args, DRAFTERS_7B)
    tiny = args.preset == "tiny"
    if args.max_new_tokens is None:
        args.max_new_tokens = (8 if tiny else 64) if args.quick else (16 if tiny else 128)
    if args.repeats is None:
        args.repeats = (2 if tiny else 3) if args.quick else (3 if tiny else 5)
    return args


def _measured(variant, setup, built, args, device, reference):
    """run_configs callback: ([row], problems); a failing variant becomes an error row."""
    try:
        row, problems = measure(variant, setup, *built, args, device, reference)
    except Exception as error:  # one broken variant must not lose the others' numbers
        message = f"{type(error).__name__}: {error}"
        row = dict(config=str(variant), kind=variant.kind, drafter=variant.drafter, backend=variant.kind)
        return [dict(row, error=message)], [f"{variant}: {message}"]
    return [row], problems


def run_drafter(spec: DrafterSpec, setup: Setup, args, device, reference) -> tuple[list[dict], list[str]]:
    """Build one drafter, run its variants, free it: (rows, problems)."""
    rows = []
    if not spec.hf_assisted:
        rows.append(
            dict(
                config=f"hf_assisted-{spec.name}",
                kind="hf_assisted",
                drafter=spec.name,
                backend="hf_assisted",
                status="skipped",
                reason=spec.hf_reason,
            )
        )
    try:
        built = list(spec.build())  # [drafter, adapter, drafter_inputs], emptied when done
    except Exception as error:  # one drafter that cannot be built must not lose the others
        message = f"{type(error).__name__}: {error}"
        rows.append(dict(config=spec.name, drafter=spec.name, backend="-", error=message))
        return rows, [f"{spec.name}: building the drafter failed: {message}"]
    try:
        spec_rows, problems = harness.run_configs(
            variants_for(spec, args),
            lambda variant: _measured(variant, setup, built, args, device, reference),
        )
    finally:
        built.clear()
        harness.free_cuda_memory(device)
    return rows + spec_rows, problems


def main(argv=None) -> int:
    args = parse_args(argv)
    device, smoke, info = harness.start_run(args)
    torch.manual_seed(SEED)
    setup = setup_for(args.preset, device, args.drafters or list(DRAFTERS_7B))
    print(f"preset {setup.preset}: {setup.details['target']}; {ACCEPTANCE_NOTES[setup.preset]}", flush=True)

    rows, problems = harness.run_configs(
        [Variant("ar")], lambda v: _measured(v, setup, (None, None, None), args, device, None)
    )
    ar_row = rows[0]
    reference = ar_row.pop("_tokens", None)
    if reference is None:
        problems.append("the autoregressive baseline failed; nothing to compare against")
    else:
        for spec in setup.drafters:
            spec_rows, found = run_drafter(spec, setup, args, device, reference)
            rows += spec_rows
            problems += found
        for row in rows:
            if "total_ms" in row and ar_row.get("total_ms"):
                row["speedup_vs_ar"] = ar_row["total_ms"]["median"] / row["total_ms"]["median"]
                if row.get("ttft_ms") and ar_row.get("ttft_ms"):
                    row["ttft_speedup_vs_ar"] = ar_row["ttft_ms"]["median"] / row["ttft_ms"]["median"]
            model = analytic(row, ar_row, args.max_new_tokens) if ar_row.get("ttft_ms") else None
            if model is not None:
                row["analytic"] = model
                row["system_efficiency"] = model["system_efficiency"]

    print()
    print(harness.format_table(_table_rows(rows), TABLE_COLUMNS))
    print(f"acceptance: {ACCEPTANCE_NOTES[setup.preset]}")
    skipped = [row for row in rows if row.get("status") == "skipped"]
    for row in skipped:
        print(f"skipped {row['config']}: {row['reason']}")
    if smoke:
        print(harness.SMOKE_BANNER)

    drafters = {
        spec.name: dict(
            description=spec.description,
            parameters=spec.parameters,
            hf_assisted=spec.hf_assisted,
            hf_assisted_reason=spec.hf_reason or None,
        )
        for spec in setup.drafters
    }
    payload = harness.results_payload(
        OP,
        smoke,
        info,
        ["ar", "hf_assisted", "ours"],
        [row["config"] + ": " + row["reason"] for row in skipped],
        rows,
        problems,
        preset=setup.preset,
        dtype=str(setup.dtype).replace("torch.", ""),
        models=dict(setup.details, drafters=drafters),
        acceptance_note=ACCEPTANCE_NOTES[setup.preset],
        request=dict(
            batch=1,
            max_new_tokens=args.max_new_tokens,
            temperature=0.0,
            eos="disabled (every variant generates max_new_tokens)",
            repeats=args.repeats,
            warmup=args.warmup,
            free_token_budget=args.free_token_budget,
            engine_backend=args.backend,
            gammas=args.gammas,
            tree=None if args.tree is None else dataclasses.asdict(args.tree),
        ),
        timing_details=dict(
            total="wall clock around the generate call, device synchronised before and after",
            ttft="ours: engine stats ttft_ms; HF: first new token handed to a generate() streamer",
            preprocessing="not timed (done once before the runs)",
        ),
        analytic_model=ANALYTIC_MODEL,
    )
    return harness.finish_run(OP, args.out, smoke, info, payload, problems)


# ----------------------------------------------------------------------------------------------
# pytest: `pytest bench/bench_e2e.py` (bench/conftest.py collects bench_*.py)
# ----------------------------------------------------------------------------------------------


def test_script_smoke(tmp_path) -> None:
    """The tiny preset on CPU end to end: greedy outputs identical to target.generate, JSON complete."""
    from crossspec_kernels.runtime.stages import STAGES  # the documented stages: stats["stage_ms"] lists all

    assert main(["--preset", "tiny", "--cpu", "--quick", "--out", str(tmp_path)]) == 0
    written = list(tmp_path.glob(f"{OP}-*.json"))
    assert len(written) == 1
    payload = json.loads(written[0].read_text())
    assert payload["smoke_test"] is True and payload["preset"] == "tiny" and not payload["problems"]
    for key in ("device", "torch", "command", "git", "date"):
        assert key in payload["environment"], key
    assert set(payload["analytic_model"]) >= {"predicted_speedup", "system_efficiency", "ttft_pred"}
    rows = {row["config"]: row for row in payload["results"]}
    assert "ar" in rows and "hf_assisted-llama-tiny-g3" in rows
    assert (
        rows["hf_assisted-eventgpt-tiny"]["status"] == "skipped"
        and rows["hf_assisted-eventgpt-tiny"]["reason"]
    )
    ours = [row for row in rows.values() if row.get("kind") == "ours"]
    assert {row["drafter"] for row in ours} == {"eventgpt-tiny", "llama-tiny"}
    assert any(row["draft"].startswith("TreeDraft") for row in ours)
    for row in rows.values():
        if row.get("status") == "skipped":
            continue
        assert "error" not in row, row
        assert row["tokens_identical"] is True, row["config"]
        assert row["new_tokens"] == payload["request"]["max_new_tokens"]
        for key in ("total_ms", "ttft_ms", "tokens_per_s"):
            assert set(row[key]) == {"median", "p20", "p80"}, (row["config"], key)
            assert row[key]["p20"] <= row[key]["median"] <= row[key]["p80"]
    for row in ours:
        for key in ("acceptance_rate", "mean_accepted_length", "free_tokens", "rounds", "system_efficiency"):
            assert row[key] is not None, (row["config"], key)
        assert set(row["stage_ms"]) == set(STAGES) and not row["fallback"]
        assert 0.0 <= row["acceptance_rate"] <= 1.0
        assert row["analytic"]["predicted_speedup"] > 0
    # The drafters copy the target's LM, so some drafts must be accepted somewhere in the run.
    assert any(row["mean_accepted_length"] > 0 for row in ours)


if __name__ == "__main__":
    sys.exit(main())
