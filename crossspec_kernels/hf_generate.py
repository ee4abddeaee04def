"""``model.generate(..., custom_generate=crossspec_kernels.hf.custom_generate, drafter=...)``.

transformers (4.57 and 5.x) prepares the generation config, logits processors, stopping criteria,
attention mask and cache as usual, then hands everything to the callable in place of its own
decoding loop; keyword arguments named in the callable's signature but not in ``_sample``'s
(``drafter``, ``drafter_inputs``, ``adapter``, ``draft``, ``seed``, ...) are routed to it.
"""

from __future__ import annotations

import torch

from crossspec_kernels.runtime.engine import CrossSpecEngine

# Model inputs generate() prepares for its own loop, which the engine builds itself.
_MANAGED = ("past_key_values", "use_cache", "position_ids", "cache_position", "logits_to_keep")
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")
_ALLOWED_STOPPERS = ("MaxLengthCriteria", "EosTokenCriteria")


def custom_generate(
    model,
    input_ids: torch.Tensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    drafter=None,
    drafter_inputs=None,
    adapter=None,
    draft=None,
    free_token_budget: int = 32,
    seed: int | None = None,
    sampling: str = "rejection",
    backend: str | None = None,
    crossspec_stats: dict | None = None,
    **model_kwargs,
):
    """Speculative decoding behind ``generate``; returns what ``generate`` returns.

    Extra ``generate`` keywords: ``drafter`` (required), ``drafter_inputs`` (required),
    ``adapter``, ``draft`` (ChainDraft/TreeDraft), ``free_token_budget``, ``seed`` (None draws one
    from torch's global generator, so ``torch.manual_seed`` controls sampling as with HF),
    ``sampling`` ("rejection" or "coupled", see ``runtime.sampling``),
    ``backend`` (the engine's kernel backend) and ``crossspec_stats``: a dict the engine's stats
    are copied into.
    Supported: greedy, and sampling with temperature only (pass ``top_k=0``: HF's default top-k 50
    is not a transform the verifier applies); max_new_tokens/max_length, eos_token_id,
    pad_token_id, return_dict_in_generate (sequences only). Anything else raises.
    """
    if drafter is None or drafter_inputs is None:
        raise ValueError("custom_generate: pass drafter= and drafter_inputs= to generate()")
    if synced_gpus:
        raise ValueError("custom_generate: synced_gpus is not supported")
    if streamer is not None:
        raise ValueError("custom_generate: streamer is not supported")
    config = generation_config
    if getattr(config, "num_beams", 1) != 1 or getattr(config, "num_return_sequences", 1) != 1:
        raise ValueError("custom_generate: beam search and num_return_sequences > 1 are not supported")
    for flag in _OUTPUT_FLAGS:
        if getattr(config, flag, False):
            raise ValueError(f"custom_generate: {flag}=True is not supported (sequences only)")
    do_sample = bool(getattr(config, "do_sample", False))
    temperature = float(config.temperature if config.temperature is not None else 1.0) if do_sample else 0.0
    _check_processors(logits_processor, do_sample)
    _check_stoppers(stopping_criteria)

    max_new_tokens = config.max_length - input_ids.shape[1]
    if max_new_tokens < 1:
        raise ValueError(
            f"custom_generate: max_length {config.max_length} leaves no room after {input_ids.shape[1]} prompt tokens"
        )
    eos = config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = config.pad_token_id
    if pad is None and eos:
        pad = eos[0]
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())

    target_inputs = {"input_ids": input_ids}
    for key, value in model_kwargs.items():
        if key not in _MANAGED and value is not None:
            target_inputs[key] = value
    engine = CrossSpecEngine(
        model, drafter, adapter, draft=draft, free_token_budget=free_token_budget, backend=backend
    )
    out = engine.generate(
        target_inputs,
        drafter_inputs,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        sampling=sampling,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if crossspec_stats is not None:
        crossspec_stats.update(out.stats)
    sequences = torch.cat([input_ids, out.sequences.to(input_ids.dtype)], dim=1)
    if getattr(config, "return_dict_in_generate", False):
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences


def _check_processors(processors, do_sample: bool) -> None:
    allowed = ("TemperatureLogitsWarper",) if do_sample else ()
    unsupported = [type(p).__name__ for p in processors or () if type(p).__name__ not in allowed]
    if unsupported:
        hint = " (for sampling pass top_k=0: HF's default is 50)" if "TopKLogitsWarper" in unsupported else ""
        raise ValueError(
            f"custom_generate: logits processors {unsupported} are not supported; the verifier keeps the "
            f"target's own distribution, greedy or softmax(logits / temperature){hint}"
        )


def _check_stoppers(criteria) -> None:
    unsupported = [type(c).__name__ for c in criteria or () if type(c).__name__ not in _ALLOWED_STOPPERS]
    if unsupported:
        raise ValueError(f"custom_generate: stopping criteria {unsupported} are not supported")
