"""SmolLM2-135M-Instruct test bed: train a B1 feature head on the model's own greedy outputs, then
measure its offline per-position acceptance on held-out prompts.

    .venv/bin/python scripts/smollm2_bed.py --work-dir ~/.cache/crossspec/smollm2-bed --minutes 20

Stages (each cached in --work-dir, so a rerun resumes where it stopped):
1. corpus: greedy generations of the model from prompts built here from templates x topics. The
   held-out prompts use templates *and* topics that the training prompts never use, so the score is
   not a score on the training templates. Teacher forcing over the model's own greedy output is
   the distribution a drafter meets at inference.
2. train: ``train_feature_head`` (KL to the target's next-token distribution + SmoothL1 feature
   regression, training-time rollout), checkpointed, stopped after --minutes of training.
3. eval: ``evaluate_feature_head`` on the held-out generations; the report goes to --out (JSON).

``--kind l5`` / ``l5f`` trains and runs the research's cross-modal heads on a real drafter: the
model's first ``--drafter-layers`` decoder layers and its final norm (same tokenizer and hidden
size, a fraction of the cost), whose final-norm features the head reads (L5F: next to the
target's). In the engine that drafter drafts the free tokens during the prefill, then the head.

Run with 1 thread (the default here, --threads): the numbers are CPU smoke numbers, not speed claims.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

TRAIN_TEMPLATES = (
    "Explain {topic} to a curious teenager.",
    "Write a short paragraph about {topic}.",
    "What are three interesting facts about {topic}?",
    "Give me a beginner's guide to {topic}.",
    "Why does {topic} matter in everyday life?",
    "Summarize the history of {topic} in a few sentences.",
    "List some common misconceptions about {topic}.",
    "Write a haiku and then a short explanation about {topic}.",
)
# Added for the third head: more instruction styles widen the corpus (held-out templates stay disjoint).
MORE_TRAIN_TEMPLATES = (
    "Can you explain how {topic} works, step by step?",
    "Tell me a short story that teaches something about {topic}.",
    "What is the most important thing to know about {topic}?",
    "Write the introduction of a blog post about {topic}.",
    "What are the pros and cons of {topic}?",
    "Give a simple definition of {topic} and one example.",
    "I am studying {topic} for an exam. What should I focus on?",
    "Write a friendly email to a friend about {topic}.",
    "What would the world be like without {topic}?",
    "Create a short quiz with three questions about {topic}.",
    "Explain {topic} in one paragraph for a newspaper.",
    "Which jobs have something to do with {topic}?",
)
HELD_OUT_TEMPLATES = (
    "Describe {topic} as if you were a tour guide.",
    "How would you teach {topic} to a ten-year-old?",
    "What questions do scientists still ask about {topic}?",
    "Compare {topic} with something people use every day.",
)
TRAIN_TOPICS = (
    "photosynthesis",
    "the water cycle",
    "volcanoes",
    "black holes",
    "the French Revolution",
    "machine learning",
    "bread baking",
    "the immune system",
    "electric cars",
    "honey bees",
    "the stock market",
    "chess openings",
    "rainbows",
    "the Roman Empire",
    "plate tectonics",
    "coffee",
    "recycling",
    "the human heart",
    "solar panels",
    "jazz music",
    "earthquakes",
    "the Internet",
    "vaccines",
    "the Moon",
    "gardening",
    "compound interest",
    "glaciers",
    "the printing press",
    "sleep",
    "octopuses",
    "bicycles",
    "democracy",
    "tea ceremonies",
    "climate change",
    "the Great Wall of China",
    "origami",
    "DNA",
    "hurricanes",
    "penguins",
    "the Olympic Games",
    # More topics widen the corpus (the first 40 were the original bed's).
    "volcanic islands",
    "the Renaissance",
    "quantum computers",
    "cheese making",
    "the nervous system",
    "hydroelectric dams",
    "butterflies",
    "the housing market",
    "poker strategy",
    "auroras",
    "the Ottoman Empire",
    "erosion",
    "chocolate",
    "composting",
    "the human brain",
    "batteries",
    "blues music",
    "tsunamis",
    "social media",
    "antibiotics",
    "Mars",
    "beekeeping",
    "inflation",
    "rivers",
    "the telescope",
    "dreams",
    "dolphins",
    "skateboards",
    "elections",
    "yoga",
    "ocean tides",
    "the pyramids of Giza",
    "knitting",
    "proteins",
    "tornadoes",
    "polar bears",
    "the World Cup",
    "nuclear power",
    "the Silk Road",
    "spiders",
    "airplanes",
    "bridges",
    "the periodic table",
    "rain forests",
    "cooking pasta",
    "video games",
    "the Vikings",
    "photography",
    "meditation",
    "the Sun",
    "weather forecasting",
    "kangaroos",
    "the Industrial Revolution",
    "3D printing",
    "sharks",
    "the piano",
    "cryptocurrency",
    "deserts",
    "the telephone",
    "probability",
    "fermentation",
    "wolves",
    "the Amazon River",
    "robots",
    "calligraphy",
    "the Milky Way",
    "running a marathon",
    "insulin",
    "castles",
    "rice farming",
    "magnets",
    "the ozone layer",
    "elephants",
    "painting with watercolors",
    "the Cold War",
    "microscopes",
    "snow",
    "electric guitars",
    "tomatoes",
    "the Pacific Ocean",
)
MORE_TRAIN_TOPICS = (
    "rockets",
    "tigers",
    "the Eiffel Tower",
    "soap",
    "clocks",
    "maps",
    "the ancient Greeks",
    "sailing",
    "bamboo",
    "frogs",
    "red blood cells",
    "thunderstorms",
    "the guitar",
    "cheetahs",
    "paper making",
    "satellites",
    "the Aztecs",
    "carpentry",
    "the human skeleton",
    "geothermal energy",
    "ants",
    "comets",
    "pottery",
    "the Mongol Empire",
    "swimming",
    "salt",
    "the Arctic",
    "sound waves",
    "whales",
    "typewriters",
    "allergies",
    "coffee shops",
    "the French language",
    "algebra",
    "hot air balloons",
    "fossils",
    "dinosaurs",
    "mountain climbing",
    "camping",
    "the bicycle chain",
    "lightning",
    "parrots",
    "the Moon landing",
    "sculpture",
    "electricity",
    "the Mediterranean Sea",
    "wheat",
    "ballet",
    "gravity",
    "sunflowers",
    "the Byzantine Empire",
    "newspapers",
    "horses",
    "the digestive system",
    "fireworks",
    "seashells",
    "cloud computing",
    "the alphabet",
    "volunteering",
    "kites",
)
HELD_OUT_TOPICS = (
    "lighthouses",
    "coral reefs",
    "the violin",
    "desert plants",
    "submarines",
    "ancient Egypt",
    "public libraries",
    "wind turbines",
    "mushrooms",
    "the metric system",
    "trains",
    "owls",
)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def build_prompts(templates, topics, seed: int) -> list[str]:
    prompts = [template.format(topic=topic) for template, topic in itertools.product(templates, topics)]
    random.Random(seed).shuffle(prompts)
    return prompts


def train_prompts() -> list[str]:
    """The first heads' 960 prompts first (so their cached generations stay valid), then every new
    template/topic pair, shuffled."""
    first = build_prompts(TRAIN_TEMPLATES, TRAIN_TOPICS, seed=0)
    every = build_prompts(TRAIN_TEMPLATES + MORE_TRAIN_TEMPLATES, TRAIN_TOPICS + MORE_TRAIN_TOPICS, seed=2)
    seen = set(first)
    return first + [prompt for prompt in every if prompt not in seen]


def encode_chat(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # transformers 5 returns a BatchEncoding, 4.x a list of ids.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def generate_corpus(model, tokenizer, prompts, *, max_new_tokens: int, batch_size: int, desc: str):
    """[{"prompt", "prompt_len", "tokens"}]: each prompt followed by the model's greedy continuation (EOS kept)."""
    import torch
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    records = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        encoded = [encode_chat(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(map(len, encoded))
        # Left padding, as generate wants; pad id = EOS (SmolLM2's pad token).
        input_ids = torch.tensor([[eos] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=eos,
            )
        for row, prompt_ids, prompt in zip(
            out[:, width:].tolist(), encoded, prompts[start : start + batch_size]
        ):
            new = row[: row.index(eos) + 1] if eos in row else row
            records.append({"prompt": prompt, "prompt_len": len(prompt_ids), "tokens": prompt_ids + new})
    return records


def stage_corpus(args, model, tokenizer) -> dict:
    """Greedy generations of every train and held-out prompt, saved after each batch (resumable:
    prompts already in WORK_DIR/corpus.json are not generated again)."""
    path = args.work_dir / "corpus.json"
    corpus = json.loads(path.read_text()) if path.is_file() else {"train": [], "held_out": []}
    splits = {
        "train": train_prompts()[: args.train_prompts],
        "held_out": build_prompts(HELD_OUT_TEMPLATES, HELD_OUT_TOPICS, seed=1)[: args.eval_prompts],
    }
    for split, prompts in splits.items():
        done = {record["prompt"] for record in corpus[split]}
        missing = [prompt for prompt in prompts if prompt not in done]
        for start in range(0, len(missing), args.gen_batch):
            corpus[split] += generate_corpus(
                model,
                tokenizer,
                missing[start : start + args.gen_batch],
                max_new_tokens=args.max_new_tokens,
                batch_size=args.gen_batch,
                desc=f"corpus ({split}) {start + args.gen_batch}/{len(missing)}",
            )
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(corpus))
            os.replace(tmp, path)
        wanted = set(prompts)
        corpus[split] = [record for record in corpus[split] if record["prompt"] in wanted]
    return corpus


def stage_train(args, model, corpus):
    import torch

    from crossspec_kernels.adapter_tools.feature_train import (
        FeatureTrainConfig,
        frequent_tokens,
        train_feature_head,
    )

    sequences = [torch.tensor(r["tokens"]) for r in corpus["train"]]
    data = feature_data(args, model, sequences) if args.kind != "b1" else sequences
    # The KL over the 8k most frequent corpus tokens (all the target's greedy choices there) costs
    # a sixth of the full 49k-row LM head; the feature term keeps the rest of the output in place.
    config = FeatureTrainConfig(
        steps=args.steps,
        rollout_steps=args.rollout_steps,
        seed=args.seed,
        batch_size=4,
        seq_len=256,
        lr=args.lr,
        feature_noise=args.feature_noise,
    )
    head = None
    if args.init_head is not None:  # continue an earlier head on this (wider) corpus
        from crossspec_kernels.models.adapters import load_adapter

        head = load_adapter(args.init_head, expected_kind=args.kind, dtype=torch.float32)
        head.load_embedding(model.get_input_embeddings().weight)
    return train_feature_head(
        model,
        data,
        args.kind,
        head=head,
        config=config,
        loss_vocab=frequent_tokens(sequences, 8192),
        checkpoint_dir=args.work_dir / "train",
        time_budget_s=args.minutes * 60,
        **({} if args.kind == "b1" else {"d_draft": model.config.hidden_size}),
    )


def layer_drafter(model, layers: int):
    """The L5/L5F bed's event drafter: ``model``'s first ``layers`` decoder layers and its final
    norm, as a model of its own (its weights copied, so the engine may switch its attention)."""
    import copy

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    drafter = type(model)(config)
    missing, _ = drafter.load_state_dict(model.state_dict(), strict=False)  # drops layers >= N
    if missing:
        raise RuntimeError(f"layer_drafter: weights missing for {missing[:3]}")
    return drafter.eval()


def feature_data(args, model, sequences):
    """The target's and the layer drafter's teacher-forced features of ``sequences`` (L5/L5F)."""
    import torch

    from crossspec_kernels.adapter_tools.feature_train import FeatureData, teacher_forcing_features

    drafter = layer_drafter(model, args.drafter_layers)
    with torch.no_grad():
        target = teacher_forcing_features(model, sequences)
        events = teacher_forcing_features(drafter, sequences)
    return FeatureData(tokens=sequences, features=target.features, drafter_features=events.features)


def stage_eval(args, model, head, records) -> dict:
    import torch

    from crossspec_kernels.adapter_tools.offline_eval import evaluate_feature_head

    sequences = [r["tokens"] for r in records]
    if args.kind != "b1":
        sequences = feature_data(args, model, [torch.tensor(t) for t in sequences])
    report = evaluate_feature_head(
        head,
        model,
        sequences,
        prompt_lens=[r["prompt_len"] for r in records],
        gamma=args.gamma,
    )
    return report.to_dict()


def export_artifact(out_dir: Path, head, vocab, corpus, report: dict) -> None:
    """The trained head as a small committed artifact: fp16 weights (the token embedding is the
    target's, not saved), the draft vocabulary, four held-out prompts and this run's report."""
    import copy

    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(head).to(torch.float16).save_pretrained(out_dir)
    (out_dir / "draft_vocab.json").write_text(json.dumps(None if vocab is None else vocab.tolist()) + "\n")
    prompts = [r["tokens"][: r["prompt_len"]] for r in corpus["held_out"][:4]]
    (out_dir / "held_out_prompts.json").write_text(json.dumps(prompts) + "\n")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def greedy_new_tokens(model, ids, max_new_tokens: int, eos: int, **kwargs):
    """``model.generate``'s greedy new tokens after the batch-1 prompt ``ids`` (the baseline)."""
    import torch

    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=eos,
        **kwargs,
    )[:, ids.shape[1] :]


def _timed(fn, *args, **kwargs):
    began = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - began


def draft_vocab(args, corpus):
    """The --draft-vocab most frequent token ids of the training corpus (None: the full vocabulary)."""
    import torch

    from crossspec_kernels.adapter_tools.feature_train import frequent_tokens

    if not args.draft_vocab:
        return None
    return frequent_tokens([torch.tensor(r["tokens"]) for r in corpus["train"]], args.draft_vocab)


def stage_engine(args, head, corpus, tokenizer) -> dict:
    """The engine with the head on held-out prompts (batch 1) against ``generate`` on a second copy
    of the model (the engine switches its target's attention), same prompts, same run."""
    import torch
    from transformers import LogitsProcessorList

    from crossspec_kernels.models.smollm2 import load_smollm2
    from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine, TreeDraft
    from crossspec_kernels.runtime.sampling import CoupledSampling

    baseline, _ = load_smollm2(args.model_dir)
    target, _ = load_smollm2(args.model_dir)
    eos = tokenizer.eos_token_id
    records = corpus["held_out"][: args.engine_prompts]
    drafts = {
        "chain": ChainDraft(args.gamma),
        "chain_adaptive": ChainDraft(args.gamma + 2, min_confidence=args.min_confidence),
        "tree": TreeDraft(*args.tree),
    }
    vocab = draft_vocab(args, corpus)
    # L5/L5F: the layer drafter reads the same prompt (it shares the tokenizer).
    drafter = None if args.kind == "b1" else layer_drafter(target, args.drafter_layers)
    engines = {
        name: CrossSpecEngine(target, drafter, draft=d, feature_head=head, draft_vocab=vocab)
        for name, d in drafts.items()
    }

    def prompt_of(record):
        return torch.tensor([record["tokens"][: record["prompt_len"]]])

    def plain(ids):
        return greedy_new_tokens(baseline, ids, args.engine_tokens, eos)

    def lookup(ids):  # HF's prompt lookup decoding: a drafter-free speculative baseline
        return greedy_new_tokens(baseline, ids, args.engine_tokens, eos, prompt_lookup_num_tokens=args.gamma)

    def spec(name, ids, **kwargs):
        drafter_inputs = None if drafter is None else dict(input_ids=ids)
        return engines[name].generate(
            dict(input_ids=ids), drafter_inputs, max_new_tokens=args.engine_tokens, **kwargs
        )

    warm = prompt_of(records[0])  # first calls pay one-off costs (allocation, lazy init)
    plain(warm)
    lookup(warm)
    for name in drafts:
        spec(name, warm)
    totals = {key: {"seconds": 0.0, "tokens": 0} for key in ("generate", "prompt_lookup", *drafts)}
    curves = {name: [] for name in drafts}
    sampled_modes = ("rejection", "coupled")
    agg = {
        name: {"drafted": 0, "accepted": 0, "row_rounds": 0}
        for name in (*drafts, *(f"chain_T0.7_{mode}" for mode in sampled_modes))
    }
    identical = coupled_identical = lookup_identical = True
    for record in records:
        ids = prompt_of(record)
        want, seconds = _timed(plain, ids)
        totals["generate"]["seconds"] += seconds
        totals["generate"]["tokens"] += want.shape[1]
        out, seconds = _timed(lookup, ids)
        lookup_identical &= torch.equal(out, want)
        totals["prompt_lookup"]["seconds"] += seconds
        totals["prompt_lookup"]["tokens"] += out.shape[1]
        for name in drafts:
            out, seconds = _timed(spec, name, ids)
            identical &= torch.equal(out.sequences, want)
            totals[name]["seconds"] += seconds
            totals[name]["tokens"] += out.sequences.shape[1]
            curves[name].append(out.stats["per_position_acceptance"])
            for key in agg[name]:
                agg[name][key] += out.stats["drafters"]["feature"][key]
        for mode in sampled_modes:
            out = spec("chain", ids, temperature=0.7, seed=0, sampling=mode)
            for key in agg[f"chain_T0.7_{mode}"]:
                agg[f"chain_T0.7_{mode}"][key] += out.stats["drafters"]["feature"][key]
        race = LogitsProcessorList([CoupledSampling(0, 0.7, ids.shape[1])])
        alone = greedy_new_tokens(
            baseline, ids, args.engine_tokens, eos, logits_processor=race
        )  # the target alone
        coupled_identical &= torch.equal(out.sequences, alone)

    def summary(name):
        counts = agg[name]
        return {
            "acceptance_rate": counts["accepted"] / max(counts["drafted"], 1),
            "mean_accepted_length": counts["accepted"] / max(counts["row_rounds"], 1),
            **counts,
        }

    speed = {key: value["tokens"] / value["seconds"] for key, value in totals.items()}
    return {
        "prompts": len(records),
        "max_new_tokens": args.engine_tokens,
        "draft_vocab": None if vocab is None else len(vocab),
        **{
            name: {"draft": str(draft), **summary(name), "speedup": speed[name] / speed["generate"]}
            for name, draft in drafts.items()
        },
        **{f"chain_sampled_T0.7_{mode}": summary(f"chain_T0.7_{mode}") for mode in sampled_modes},
        "coupled_output_identical_to_target_sampling_alone": bool(coupled_identical),
        "tokens_per_s": speed,
        "outputs_identical_to_generate": bool(identical),
        # generate(prompt_lookup_num_tokens=gamma): the strongest drafter-free baseline HF has here
        "prompt_lookup": {
            "speedup": speed["prompt_lookup"] / speed["generate"],
            "outputs_identical_to_generate": bool(lookup_identical),
        },
        # alpha_k of the fixed chain, the mean over prompts of each prompt's engine statistic
        "per_position_acceptance_chain": [sum(column) / len(column) for column in zip(*curves["chain"])],
    }


# The cost stage's draftings: chains of 1..5, a tree as wide as the 3-chain and one of 8 slots.
COST_DRAFTS = {
    **{f"chain{gamma}": ("chain", gamma) for gamma in range(1, 6)},
    "tree_2x2_3": ("tree", (2, 2, 3)),
    "tree_2x3_7": ("tree", (2, 3, 7)),
}
COST_WIDTHS = range(1, 9)  # verification blocks of 1 (a plain decode step) to 8 tokens


def verify_cost_by_width(engine, prompt: list[int], reps: int) -> dict:
    """Median ms of one target block forward + its LM head over W new tokens, W in COST_WIDTHS,
    behind ``prompt`` (the widths interleaved, so drifting load hits all alike)."""
    import torch

    runner, lm_head = engine.target_runner, engine.lm_head
    runner.allocate(1, len(prompt) + 2 * max(COST_WIDTHS), torch.float32, torch.device("cpu"))
    runner.prefill({"input_ids": torch.tensor([prompt])})
    times = {width: [] for width in COST_WIDTHS}
    generator = torch.Generator().manual_seed(0)
    for _ in range(reps):
        for width in COST_WIDTHS:
            tokens = torch.randint(0, lm_head.weight.shape[0], (1, width), generator=generator)
            began = time.perf_counter()
            lm_head(runner.forward(tokens, torch.arange(width)[None]))  # nothing committed
            times[width].append(time.perf_counter() - began)
    return {width: 1e3 * sorted(ts)[len(ts) // 2] for width, ts in times.items()}


def stage_cost(args) -> dict:
    """Where a round's time goes on this CPU, and what acceptance would pay for it.

    1. The verification block's cost by width W (target forward + LM head, ms), against a plain
       decode step (W = 1): ``c(W)``.
    2. The engine with the head (``--head``, an exported artifact: its draft vocabulary and held-out
       prompts) for every COST_DRAFTS entry against ``generate``, same prompts, same run; per
       drafting the measured speedup, E[L], verify and draft ms per round, and the speedup the parts
       explain, ``(1 + E[L]) * step / (verify + draft)``, and the E[L] that 1.3x would need at
       those costs.
    """
    import torch

    from crossspec_kernels.models.adapters import load_adapter
    from crossspec_kernels.models.smollm2 import load_smollm2
    from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine, TreeDraft

    if args.head is None or not (args.head / "held_out_prompts.json").is_file():
        raise SystemExit("--stage cost needs --head DIR, an exported head (e.g. bench/artifacts/smollm2-b1)")
    prompts = json.loads((args.head / "held_out_prompts.json").read_text())[: args.engine_prompts]
    vocab = json.loads((args.head / "draft_vocab.json").read_text())
    baseline, tokenizer = load_smollm2(args.model_dir)
    target, _ = load_smollm2(args.model_dir)
    head = load_adapter(args.head, expected_kind="b1", dtype=torch.float32)
    head.load_embedding(target.get_input_embeddings().weight)
    vocab = None if vocab is None else torch.tensor(vocab)
    engines = {
        name: CrossSpecEngine(
            target,
            None,
            draft=ChainDraft(spec) if kind == "chain" else TreeDraft(*spec),
            feature_head=head,
            draft_vocab=vocab,
        )
        for name, (kind, spec) in COST_DRAFTS.items()
    }
    eos = tokenizer.eos_token_id

    def plain(ids):
        return greedy_new_tokens(baseline, ids, args.engine_tokens, eos)

    with torch.no_grad():
        costs = verify_cost_by_width(engines["chain1"], prompts[0], reps=args.cost_reps)
    step = costs[1]
    warm = torch.tensor([prompts[0]])
    plain(warm)
    for engine in engines.values():
        engine.generate({"input_ids": warm}, None, max_new_tokens=16)
    keys = ("seconds", "tokens", "rounds", "accepted_rows", "verify_ms", "draft_ms")
    totals = {name: dict.fromkeys(keys, 0.0) for name in ("generate", *engines)}
    identical = True
    for prompt in prompts:
        ids = torch.tensor([prompt])
        want, seconds = _timed(plain, ids)
        totals["generate"]["seconds"] += seconds
        totals["generate"]["tokens"] += want.shape[1]
        for name, engine in engines.items():
            out, seconds = _timed(
                engine.generate, {"input_ids": ids}, None, max_new_tokens=args.engine_tokens
            )
            identical &= torch.equal(out.sequences, want)
            stats, total = out.stats, totals[name]
            total["seconds"] += seconds
            total["tokens"] += out.sequences.shape[1]
            total["rounds"] += stats["rounds"]
            total["accepted_rows"] += stats["mean_accepted_length"] * stats["rounds"]
            total["verify_ms"] += stats["stage_ms"]["verify.forward"] + stats["stage_ms"]["verify.accept"]
            total["draft_ms"] += stats["stage_ms"]["draft.step"]
    speed = {name: total["tokens"] / total["seconds"] for name, total in totals.items()}
    rows = {}
    for name, (kind, spec) in COST_DRAFTS.items():
        total = totals[name]
        width = 1 + (spec if kind == "chain" else spec[2])
        accepted = total["accepted_rows"] / total["rounds"]
        verify, draft = total["verify_ms"] / total["rounds"], total["draft_ms"] / total["rounds"]
        rows[name] = {
            "draft": str(engines[name].draft),
            "block_width": width,
            "speedup": speed[name] / speed["generate"],
            "mean_accepted_length": accepted,
            "verify_ms_per_round": verify,
            "draft_ms_per_round": draft,
            "verify_cost_in_steps": verify / step,
            "draft_cost_in_steps": draft / step,
            "explained_speedup": (1 + accepted) * step / (verify + draft),
            "mean_accepted_length_for_1.3x": 1.3 * (verify + draft) / step - 1,
        }
    return {
        "prompts": len(prompts),
        "max_new_tokens": args.engine_tokens,
        "draft_vocab": None if vocab is None else len(vocab),
        "verify_ms_by_width": costs,
        "verify_cost_by_width_in_steps": {width: ms / step for width, ms in costs.items()},
        "tokens_per_s": speed,
        "outputs_identical_to_generate": bool(identical),
        "draftings": rows,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/crossspec/smollm2-bed").expanduser())
    parser.add_argument("--model-dir", type=Path, default=None, help="converted SmolLM2 (default: the cache)")
    parser.add_argument("--out", type=Path, default=None, help="report JSON (default: WORK_DIR/report.json)")
    parser.add_argument(
        "--stage",
        choices=("corpus", "all", "cost"),
        default="all",
        help="corpus: stop after building the corpus; cost: only the cost stage (stage_cost) of --head",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-prompts", type=int, default=960)
    parser.add_argument("--eval-prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    parser.add_argument(
        "--steps", type=int, default=4000, help="optimizer steps (the time budget may stop it first)"
    )
    parser.add_argument(
        "--kind",
        choices=("b1", "l5", "l5f"),
        default="b1",
        help="the head: b1 reads the target's features, l5 the layer drafter's, l5f both",
    )
    parser.add_argument(
        "--drafter-layers", type=int, default=8, help="l5/l5f: the event drafter's decoder layers (of 30)"
    )
    parser.add_argument("--rollout-steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument(
        "--feature-noise", type=float, default=0.0, help="EAGLE's U(-a, a) noise on the input features"
    )
    parser.add_argument(
        "--init-head", type=Path, default=None, help="train on from this saved head instead of a new one"
    )
    parser.add_argument("--gamma", type=int, default=4, help="chain length (offline and engine)")
    parser.add_argument(
        "--tree",
        type=int,
        nargs=3,
        default=(2, 4, 8),
        metavar=("TOP_K", "DEPTH", "MAX_NODES"),
        help="the engine's TreeDraft",
    )
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=8192,
        help="the engine's head proposes only the N most frequent training tokens (0: all)",
    )
    parser.add_argument(
        "--min-confidence", type=float, default=0.3, help="the adaptive chain's ChainDraft(min_confidence)"
    )
    parser.add_argument("--engine-prompts", type=int, default=12, help="held-out prompts run in the engine")
    parser.add_argument("--engine-tokens", type=int, default=128, help="max_new_tokens in the engine stage")
    parser.add_argument(
        "--head",
        type=Path,
        default=None,
        help="evaluate this saved head (e.g. bench/artifacts/smollm2-b1) instead of training one",
    )
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        help="write the head (fp16), its draft vocabulary, held-out prompts and the report here "
        "(the artifact tests/test_smollm2_engine.py reads)",
    )
    parser.add_argument(
        "--eval-train",
        type=int,
        default=48,
        help="also score the head offline on this many training sequences",
    )
    parser.add_argument(
        "--cost-reps", type=int, default=15, help="repetitions of each width in the cost stage"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.minutes <= 0:
        parser.error(f"--minutes must be > 0, got {args.minutes}")
    if not 1 <= args.drafter_layers < 30:
        parser.error(f"--drafter-layers must lie in [1, 30), got {args.drafter_layers}")
    if args.stage == "cost" and args.kind != "b1":
        parser.error(f"--stage cost measures B1 heads only, got --kind {args.kind}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from crossspec_kernels.models.smollm2 import load_smollm2

    torch.set_num_threads(args.threads)
    if args.stage == "cost":
        report = {**_environment(args), "cost": stage_cost(args)}
        _write_report(args, report)
        return 0
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2(args.model_dir)
    corpus = stage_corpus(args, model, tokenizer)
    print(
        f"corpus: {len(corpus['train'])} train / {len(corpus['held_out'])} held-out sequences",
        file=sys.stderr,
    )
    if args.stage == "corpus":
        return 0

    began = time.monotonic()
    if args.head is None:
        head, history = stage_train(args, model, corpus)
        head.save_pretrained(args.work_dir / "head")
    else:
        from crossspec_kernels.models.adapters import load_adapter

        head, history = load_adapter(args.head, expected_kind=args.kind, dtype=torch.float32), []
    head.load_embedding(model.get_input_embeddings().weight)
    train_s = time.monotonic() - began
    report = {
        **_environment(args),
        "kind": args.kind,
        "drafter_layers": None if args.kind == "b1" else args.drafter_layers,
        "train_steps": len(history),
        "train_seconds_this_run": round(train_s, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "offline_greedy": stage_eval(args, model, head, corpus["held_out"]),
        # The same score on training sequences: how much of the held-out gap is generalisation.
        "offline_greedy_train": stage_eval(args, model, head, corpus["train"][: args.eval_train]),
        "engine": stage_engine(args, head, corpus, tokenizer),
    }
    offline, engine = report["offline_greedy"], report["engine"]["chain"]
    report["offline_vs_engine_acceptance"] = {
        "offline": offline["acceptance_rate"],
        "engine": engine["acceptance_rate"],
        "difference": engine["acceptance_rate"] - offline["acceptance_rate"],
    }
    _write_report(args, report)
    if args.export is not None:
        export_artifact(args.export, head, draft_vocab(args, corpus), corpus, report)
    return 0


def _environment(args) -> dict:
    import torch
    import transformers

    return {
        "device": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_report(args, report: dict) -> None:
    out = args.out or args.work_dir / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
