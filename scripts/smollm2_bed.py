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


def encode_chat(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # transformers 5 returns a BatchEncoding, 4.x a list of ids.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def generate_corpus(model, tokenizer, prompts, *, max_new_tokens: int, batch_size: int, desc: str):
    """[{"prompt_len", "tokens"}]: each prompt followed by the model's greedy continuation (EOS kept)."""
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
        for row, prompt_ids in zip(out[:, width:].tolist(), encoded):
            new = row[: row.index(eos) + 1] if eos in row else row
            records.append({"prompt_len": len(prompt_ids), "tokens": prompt_ids + new})
    return records


def stage_corpus(args, model, tokenizer) -> dict:
    path = args.work_dir / "corpus.json"
    if path.is_file():
        return json.loads(path.read_text())
    train = build_prompts(TRAIN_TEMPLATES, TRAIN_TOPICS, seed=0)[: args.train_prompts]
    held_out = build_prompts(HELD_OUT_TEMPLATES, HELD_OUT_TOPICS, seed=1)[: args.eval_prompts]
    corpus = {
        "train": generate_corpus(
            model,
            tokenizer,
            train,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.gen_batch,
            desc="corpus (train)",
        ),
        "held_out": generate_corpus(
            model,
            tokenizer,
            held_out,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.gen_batch,
            desc="corpus (held out)",
        ),
    }
    path.write_text(json.dumps(corpus))
    return corpus


def stage_train(args, model, corpus):
    import torch

    from crossspec_kernels.adapter_tools.feature_train import (
        FeatureTrainConfig,
        frequent_tokens,
        train_feature_head,
    )

    sequences = [torch.tensor(r["tokens"]) for r in corpus["train"]]
    # The KL over the 8k most frequent corpus tokens (all the target's greedy choices there) costs
    # a sixth of the full 49k-row LM head; the feature term keeps the rest of the output in place.
    config = FeatureTrainConfig(
        steps=args.steps, rollout_steps=args.rollout_steps, seed=args.seed, batch_size=4, seq_len=256
    )
    return train_feature_head(
        model,
        sequences,
        "b1",
        config=config,
        loss_vocab=frequent_tokens(sequences, 8192),
        checkpoint_dir=args.work_dir / "train",
        time_budget_s=args.minutes * 60,
    )


def stage_eval(args, model, head, corpus) -> dict:
    from crossspec_kernels.adapter_tools.offline_eval import evaluate_feature_head

    held_out = corpus["held_out"]
    report = evaluate_feature_head(
        head,
        model,
        [r["tokens"] for r in held_out],
        prompt_lens=[r["prompt_len"] for r in held_out],
        gamma=args.gamma,
    )
    return report.to_dict()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/crossspec/smollm2-bed").expanduser())
    parser.add_argument("--model-dir", type=Path, default=None, help="converted SmolLM2 (default: the cache)")
    parser.add_argument("--out", type=Path, default=None, help="report JSON (default: WORK_DIR/report.json)")
    parser.add_argument(
        "--stage", choices=("corpus", "all"), help="corpus: stop after building the corpus", default="all"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-prompts", type=int, default=320)
    parser.add_argument("--eval-prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    parser.add_argument(
        "--steps", type=int, default=4000, help="optimizer steps (the time budget may stop it first)"
    )
    parser.add_argument("--rollout-steps", type=int, default=3)
    parser.add_argument("--gamma", type=int, default=4, help="chain length scored offline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.minutes <= 0:
        parser.error(f"--minutes must be > 0, got {args.minutes}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from crossspec_kernels.models.smollm2 import load_smollm2

    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2(args.model_dir)
    corpus = stage_corpus(args, model, tokenizer)
    print(
        f"corpus: {len(corpus['train'])} train / {len(corpus['held_out'])} held-out sequences",
        file=sys.stderr,
    )
    if args.stage == "corpus":
        return 0
    import transformers

    began = time.monotonic()
    head, history = stage_train(args, model, corpus)
    train_s = time.monotonic() - began
    head.save_pretrained(args.work_dir / "head")
    report = {
        "device": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_steps": len(history),
        "train_seconds_this_run": round(train_s, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "offline_greedy": stage_eval(args, model, head, corpus),
    }
    out = args.out or args.work_dir / "report.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
