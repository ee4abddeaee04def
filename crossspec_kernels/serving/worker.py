"""EngineWorker: the engine of one replica, and how a batch of requests runs on it (no Ray here).

A batch from ``@serve.batch`` may mix settings. ``CrossSpecEngine.generate`` takes one temperature
and one ``max_new_tokens`` per call (seeds may differ per row), so the batch is split by temperature
and each group runs as one left-padded engine call with the group's largest ``max_tokens``; each row
is cut to its own ``max_tokens``:

* greedy requests (temperature 0): a greedy continuation's prefix does not depend on its length or
  on the rows beside it, so each equals ``target.generate`` for that request alone;
* sampled requests of one temperature run together with one seed per row and
  ``sampling="coupled"`` (``runtime.sampling``): token t of a row is an exact sample of
  softmax(logits_t / T) drawn with noise keyed by (the row's seed, t) only, so a request's tokens
  depend on its seed, temperature and inputs, not on which requests shared its batch, the drafts
  or the timing; they equal ``target.generate`` with ``CoupledSampling(seed, T, prompt_width)`` as
  logits processor. A retried request gets the same tokens.

Tokens stream: ``run_batch(prepared, on_tokens)`` calls ``on_tokens(n, tokens)`` from the engine's
thread after every round with the tokens request n committed in it (the engine's ``on_commit``).
If a group's call raises, its requests run again one by one, so one bad request fails alone; a rerun
sends on only the tokens not sent before (and fails the request if it disagrees with them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from crossspec_kernels.serving.config import ServeConfig
from crossspec_kernels.serving.schema import CompletionRequest, Limits, RequestError, parse_request

TINY_MODEL_NAME = "crossspec-tiny"


@dataclass
class Prepared:
    """A request with its model inputs (batch 1 tensors on the engine's device)."""

    request: CompletionRequest
    target_inputs: dict
    drafter_inputs: dict
    prompt_tokens: int  # the target's prompt length, video placeholders included


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence) or "length"
    prompt_tokens: int
    batch_size: int  # requests in the engine call that produced it
    stats: dict = field(default_factory=dict)


def tiny_inputs(
    drafter_config, question_ids, clip_seed: int, device="cpu", *, backend: str | None = None
) -> tuple[dict, dict]:
    """(target inputs, drafter inputs) for tiny models: a synthetic clip and the question's ids.

    The same clip as ``crossspec demo`` renders (``demo.SENSOR``, ``CLIP_US``, ``EVENT_RATE``);
    ``backend`` is events_to_frames' backend (None: its default for the device)."""
    import torch

    from crossspec_kernels.demo import make_request

    question = torch.tensor(list(question_ids), dtype=torch.int64)
    target_inputs, drafter_inputs, _ = make_request(
        drafter_config, clip_seed, device, question=question, backend=backend
    )
    return target_inputs, drafter_inputs


def build_tiny_models(seed: int, device="cpu"):
    """(target, drafter) of ``crossspec demo``: tiny random Video-LLaVA and EventGPT sharing an LLM."""
    from crossspec_kernels.demo import build_models

    return build_models(device, seed)


class EngineWorker:
    """Builds the models and the engine from a ServeConfig; validates, prepares and runs requests."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine, TreeDraft

        self.config = config
        self.tokenizer = None
        if config.tiny:
            self.device = torch.device(
                "cuda"
                if config.device == "auto" and torch.cuda.is_available()
                else config.device.replace("auto", "cpu")
            )
            self.dtype = torch.float32
            target, drafter = build_tiny_models(config.tiny_seed, self.device)
            adapter = None
            self.model_name = TINY_MODEL_NAME
        else:
            target, drafter, adapter = self._load_real(config)
            self.model_name = Path(config.target).name
        self.target, self.drafter = target, drafter
        draft = config.draft
        draft_config = (
            ChainDraft(draft.gamma)
            if draft.kind == "chain"
            else TreeDraft(top_k=draft.top_k, depth=draft.depth, max_nodes=draft.max_nodes)
        )
        self.engine = CrossSpecEngine(
            target,
            drafter,
            adapter,
            draft=draft_config,
            free_token_budget=draft.free_token_budget,
            backend=None if config.backend == "auto" else config.backend,
        )
        eos = getattr(target.generation_config, "eos_token_id", None)
        self.eos_ids = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        text_config = target.config.get_text_config()
        reserved = [target.config.video_token_index, getattr(target.config, "image_token_index", None)]
        reserved.append(getattr(drafter.config, "event_token_index", None))
        self.limits = Limits(
            max_new_tokens_limit=config.max_new_tokens_limit,
            default_max_new_tokens=config.default_max_new_tokens,
            max_prompt_tokens=config.max_prompt_tokens,
            vocab_size=int(text_config.vocab_size),
            reserved_ids=tuple(int(i) for i in reserved if i is not None),
            has_tokenizer=self.tokenizer is not None,
            synthetic_clips=config.tiny,
        )
        self.batches_run = 0
        # Requests are preprocessed in threads beside a running batch. Triton's CPU interpreter
        # (TRITON_INTERPRET=1) keeps global launch state, so two threads must not both run Triton
        # kernels there: on CPU, preprocessing runs the events_to_frames reference (the spec).
        self.preprocess_backend = "reference" if self.device.type == "cpu" else None
        self.healthy_error: str | None = None  # set when the device fails; check_health reports it

    # models ------------------------------------------------------------------------------------
    def _load_real(self, config: ServeConfig):
        """Local folders, loaded as ``crossspec generate`` loads them (same checks and errors)."""
        import torch

        from crossspec_kernels import generate_cli as gen
        from crossspec_kernels.generate_inputs import existing_dir

        self.device = gen.resolve_device(config.device)
        self.dtype = (
            getattr(torch, config.dtype)
            if config.dtype != "auto"
            else (torch.float16 if self.device.type == "cuda" else torch.float32)
        )
        target_dir = existing_dir(config.target, "target")
        drafter_dir = existing_dir(config.drafter, "drafter")
        target = gen.load_target(target_dir, self.dtype, self.device)
        drafter = gen.load_drafter(drafter_dir, self.dtype, self.device)
        self.preprocess, self.tokenizer, _, _ = gen.target_preprocessor("auto", target_dir, target)
        drafter_tokenizer = gen.load_tokenizer(drafter_dir, "drafter")
        gen.check_vocabularies(
            self.tokenizer,
            drafter_tokenizer,
            int(target.config.get_text_config().vocab_size),
            int(drafter.config.text_config.vocab_size),
        )
        from crossspec_kernels.models.eventgpt import EventGPTPromptBuilder

        self.prompt_builder = EventGPTPromptBuilder(drafter.config, tokenizer=drafter_tokenizer)
        adapter = gen.load_adapter_checked(config.adapter, drafter, target, self.dtype, self.device)
        return target, drafter, adapter

    # requests ----------------------------------------------------------------------------------
    def parse(self, body) -> CompletionRequest:
        return parse_request(body, self.limits)

    def prepare(self, request: CompletionRequest) -> Prepared:
        """Model inputs of one request; RequestError for attachments that cannot be read."""
        if self.config.tiny:
            target_inputs, drafter_inputs = tiny_inputs(
                self.drafter.config,
                request.prompt,
                request.attachment["synthetic_clip_seed"],
                self.device,
                backend=self.preprocess_backend,
            )
        else:
            target_inputs, drafter_inputs = self._prepare_real(request)
        return Prepared(request, target_inputs, drafter_inputs, int(target_inputs["input_ids"].shape[1]))

    def _attachment_path(self, name: str, key: str) -> str:
        root = self.config.attachment_root
        if root is None:
            raise RequestError(
                "this server takes no attachment files (no attachment_root configured)", param="attachment"
            )
        base = Path(root).resolve()
        path = (base / name).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            raise RequestError(
                f"'attachment.{key}' {name!r} is not a file inside the server's attachment root",
                param="attachment",
            )
        return str(path)

    def _prepare_real(self, request: CompletionRequest) -> tuple[dict, dict]:
        import torch

        from crossspec_kernels.generate_cli import TARGET_TEMPLATE
        from crossspec_kernels.generate_inputs import (
            GenerateError,
            load_events,
            load_video,
            target_num_frames,
        )
        from crossspec_kernels.models.eventgpt import preprocess_event_frames
        from crossspec_kernels.ops.events_to_frames import events_to_frames

        if not isinstance(request.prompt, str):
            raise RequestError(
                "these models take a text 'prompt' (the question about the clip)", param="prompt"
            )
        question_tokens = len(self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
        if question_tokens > self.limits.max_prompt_tokens:
            raise RequestError(
                f"'prompt' has {question_tokens} tokens, over this replica's max_prompt_tokens "
                f"{self.limits.max_prompt_tokens}",
                param="prompt",
                status=413,
            )
        attachment = request.attachment
        try:
            events, _ = load_events(
                self._attachment_path(attachment["events"], "events"), attachment["window_us"], None
            )
            video, _ = load_video(
                self._attachment_path(attachment["video"], "video"), target_num_frames(self.target)[0]
            )
        except GenerateError as error:
            raise RequestError(f"attachment: {error}", param="attachment") from error
        if len(events) == 0:
            raise RequestError("attachment: no events in the window", param="attachment")
        target_inputs = self.preprocess(TARGET_TEMPLATE.format(question=request.prompt), video)
        target_inputs = {
            key: value.to(device=self.device, dtype=self.dtype if value.is_floating_point() else value.dtype)
            for key, value in target_inputs.items()
        }
        on_device = events.to(self.device)
        raster = events_to_frames(
            on_device.x,
            on_device.y,
            on_device.t,
            on_device.p,
            sensor_size=events.sensor_size,
            representation="eventgpt",
            num_frames=self.drafter.config.num_frames,
            backend=self.preprocess_backend,
        )
        pixels = preprocess_event_frames(raster, self.drafter.config.vision_config.image_size)
        drafter_ids = self.prompt_builder(request.prompt)[None].to(self.device)
        drafter_inputs = {
            "input_ids": drafter_ids,
            "attention_mask": torch.ones_like(drafter_ids),
            "event_pixel_values": pixels[None].to(device=self.device, dtype=self.dtype),
        }
        return target_inputs, drafter_inputs

    def decode(self, token_ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # batches -----------------------------------------------------------------------------------
    def run_batch(self, prepared: list[Prepared], on_tokens=None) -> list[Completion | Exception]:
        """One result per request, in order: a Completion, or the exception that request raised.

        ``on_tokens(n, tokens)``, if given, is called from this thread as rounds commit tokens: the
        calls for request n concatenate to its Completion's ``token_ids`` (cut at its own
        ``max_tokens`` and first end of sequence)."""
        groups: dict[float, list[int]] = {}
        for n, item in enumerate(prepared):
            groups.setdefault(item.request.temperature, []).append(n)
        streams = [
            _TokenStream(n, item.request.max_tokens, self.eos_ids, on_tokens)
            for n, item in enumerate(prepared)
        ]
        results: list[Completion | Exception | None] = [None] * len(prepared)
        for group in groups.values():
            try:
                for n, completion in zip(group, self._run_group(prepared, group, streams)):
                    results[n] = completion
            except Exception as error:
                if len(group) == 1:
                    results[group[0]] = self._note_failure(error)
                    continue
                for n in group:  # one bad request must not fail the others
                    try:
                        results[n] = self._run_group(prepared, [n], streams)[0]
                    except Exception as single_error:
                        results[n] = self._note_failure(single_error)
        for n, result in enumerate(results):
            if isinstance(result, Completion):
                try:
                    streams[n].finish(result.token_ids)
                except RuntimeError as error:
                    results[n] = error
        self.batches_run += 1
        return results

    def _note_failure(self, error: Exception) -> Exception:
        text = str(error)
        if "CUDA error" in text or "device-side assert" in text:
            self.healthy_error = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
        return error

    def _run_group(
        self, prepared: list[Prepared], group: list[int], streams: list[_TokenStream]
    ) -> list[Completion]:
        """One engine call for requests ``group`` (indices into ``prepared``), all of one temperature."""
        from crossspec_kernels.demo import left_pad_batch

        items = [prepared[n] for n in group]
        temperature = items[0].request.temperature
        sampled = {}
        if temperature > 0:  # one seed per row; coupled: each row's tokens depend on its seed only
            sampled = {"seed": [item.request.seed for item in items], "sampling": "coupled"}
        on_commit = None
        if any(streams[n].on_tokens is not None for n in group):
            for n in group:
                streams[n].restart()
            on_commit = lambda row, tokens: streams[group[row]].commit(tokens)
        max_new_tokens = max(item.request.max_tokens for item in items)
        start = time.perf_counter()
        output = self.engine.generate(
            left_pad_batch([item.target_inputs for item in items]),
            left_pad_batch([item.drafter_inputs for item in items]),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            on_commit=on_commit,
            **sampled,
        )
        seconds = time.perf_counter() - start
        rows = output.sequences.cpu().tolist()
        stats = {
            "sampling": output.stats["sampling"],
            "acceptance_rate": float(output.stats["acceptance_rate"]),
            "mean_accepted_length": float(output.stats["mean_accepted_length"]),
            "rounds": int(output.stats["rounds"]),
            "fallback": bool(output.stats["fallback"]),
            "engine_ms": seconds * 1e3,
        }
        completions = []
        for item, row in zip(items, rows):
            tokens, finish = self._cut(row, item.request.max_tokens)
            completions.append(Completion(tokens, finish, item.prompt_tokens, len(items), stats))
        return completions

    def _cut(self, row: list[int], max_tokens: int) -> tuple[list[int], str]:
        """A row's own tokens: up to its first end of sequence (the engine pads after it), at most
        ``max_tokens``."""
        for position, token in enumerate(row[:max_tokens]):
            if token in self.eos_ids:
                return row[: position + 1], "stop"
        return row[:max_tokens], "length"


class _TokenStream:
    """The tokens of one request as engine rounds commit them, passed on to ``on_tokens(n, tokens)``.

    Cut as ``EngineWorker._cut`` cuts (its ``max_tokens``, its first end of sequence: the group may
    run longer). A rerun (``restart``) passes on only what was not sent before, after checking that
    it gives the tokens already sent (greedy and coupled sampling are deterministic)."""

    def __init__(self, n: int, max_tokens: int, eos_ids: set[int], on_tokens) -> None:
        self.n, self.max_tokens, self.eos_ids, self.on_tokens = n, max_tokens, eos_ids, on_tokens
        self.sent: list[int] = []
        self.attempt: list[int] = []

    def restart(self) -> None:
        self.attempt = []

    def _ended(self) -> bool:
        return len(self.attempt) >= self.max_tokens or (
            bool(self.attempt) and self.attempt[-1] in self.eos_ids
        )

    def commit(self, tokens: list[int]) -> None:
        for token in tokens:
            if self._ended():
                break
            self.attempt.append(token)
        self._send()

    def _send(self) -> None:
        done = len(self.sent)
        if self.attempt[:done] != self.sent[: len(self.attempt)]:
            raise RuntimeError(
                f"crossspec serve: the rerun of request {self.n} gave tokens {self.attempt[:done]}, not the "
                f"{self.sent[: len(self.attempt)]} already streamed"
            )
        if len(self.attempt) > done and self.on_tokens is not None:
            fresh = self.attempt[done:]
            self.sent += fresh
            self.on_tokens(self.n, fresh)

    def finish(self, token_ids: list[int]) -> None:
        """After the request's last engine call: send what its rounds did not (nothing, normally)."""
        if self.on_tokens is None:
            return
        self.attempt = list(token_ids)
        self._send()
        if self.sent != self.attempt:
            raise RuntimeError(f"crossspec serve: request {self.n} streamed {self.sent}, not its {token_ids}")
