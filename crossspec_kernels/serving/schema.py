"""The request and response schema of the serving endpoint (standard library only).

Request (HTTP ``POST /v1/completions`` body, or the dict given to the Python handle)::

    {
      "prompt": [17, 42, 5] | "What moves left?",   # token ids, or text when the server has a tokenizer
      "max_tokens": 16,          # new tokens, 1 .. the replica's max_new_tokens_limit (default: config)
      "temperature": 0.0,        # 0 = greedy (default); > 0 samples softmax(logits / temperature)
      "seed": 0,                 # int in [0, 2**63): keys the sampling noise (default 0)
      "stream": false,           # HTTP only: server-sent events, a chunk per engine round
      "attachment": {"synthetic_clip_seed": 3}               # tiny models: a synthetic clip
                  | {"video": "clip.npy", "events": "ev.h5", "window_us": [t0, t1]},  # real models,
                                                             # paths inside the config's attachment_root
      "model": "..."             # optional, ignored (OpenAI clients send it)
    }

Response::

    {"id": "cmpl-...", "object": "text_completion", "created": 1700000000, "model": "crossspec-tiny",
     "choices": [{"index": 0, "token_ids": [...], "text": "..." | null, "finish_reason": "stop" | "length"}],
     "usage": {"prompt_tokens": P, "completion_tokens": C, "total_tokens": P + C},
     "crossspec": {"replica": "...", "batch_size": n, "sampling": "greedy" | "coupled",
                   "acceptance_rate": a, "mean_accepted_length": m, "rounds": r, ...}}

Greedy requests (temperature 0) return what ``target.generate(do_sample=False)`` returns for that
request alone. Sampled requests use coupled sampling (``runtime.sampling``, the engine's
``sampling="coupled"``): token t is an exact sample of softmax(logits_t / temperature) drawn with
noise keyed by the request's ``seed`` and t only, so a request's tokens depend on its seed,
temperature, prompt and attachment, never on which requests shared its batch (requests of one
temperature run batched, one seed per row); they equal ``target.generate`` with
``CoupledSampling(seed, temperature, prompt_width)`` as logits processor.

Streaming chunks have ``"object": "text_completion.chunk"`` and, in ``choices[0]``, the tokens one
engine round committed for this request (one or more; ``finish_reason`` null), sent as the round
ends; the last chunk has no token, the finish reason and ``usage``. Over HTTP they come as
``data: {json}`` server-sent events ending with ``data: [DONE]``.

Errors: HTTP 400 for a wrong schema, 413 for a request above the replica's limits, both with
``{"error": {"message": ..., "type": ..., "param": ...}}``; the Python handle raises ``RequestError``
(a ValueError) with the same message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REQUEST_KEYS = ("prompt", "max_tokens", "temperature", "seed", "stream", "attachment", "model")
SYNTHETIC_KEYS = ("synthetic_clip_seed",)
FILE_KEYS = ("video", "events", "window_us")


class RequestError(ValueError):
    """A request the server refuses; ``status`` is its HTTP status (400 schema, 413 over a limit)."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status

    def __reduce__(self):  # survives pickling across Ray with its fields
        return (_rebuild_request_error, (self.message, self.param, self.status))

    @property
    def kind(self) -> str:
        return "request_too_large" if self.status == 413 else "invalid_request_error"

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param}}


def _rebuild_request_error(message: str, param: str | None, status: int) -> RequestError:
    return RequestError(message, param=param, status=status)


@dataclass(frozen=True)
class Limits:
    """What one replica accepts."""

    max_new_tokens_limit: int
    default_max_new_tokens: int
    max_prompt_tokens: int
    vocab_size: int
    reserved_ids: tuple[int, ...] = ()  # placeholder ids (video, image, event) a prompt may not hold
    has_tokenizer: bool = False
    synthetic_clips: bool = False  # tiny models: attachments are synthetic clip seeds


@dataclass(frozen=True)
class CompletionRequest:
    """A validated request. ``prompt`` is a tuple of token ids or a text; ``attachment`` a dict."""

    prompt: tuple[int, ...] | str
    max_tokens: int
    temperature: float
    seed: int
    stream: bool
    attachment: dict

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_request(body, limits: Limits) -> CompletionRequest:
    """A CompletionRequest, or RequestError naming the field (status 400 schema, 413 over a limit)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(
            f"unknown field(s) {unknown}; the request takes {list(REQUEST_KEYS)}", param=unknown[0]
        )
    if "prompt" not in body:
        raise RequestError(
            "'prompt' is required (token ids, or text when the server has a tokenizer)", param="prompt"
        )
    prompt = body["prompt"]
    if isinstance(prompt, str):
        if not limits.has_tokenizer:
            raise RequestError(
                "this server has no tokenizer: send 'prompt' as a list of token ids", param="prompt"
            )
        if not prompt.strip():
            raise RequestError("'prompt' is empty", param="prompt")
        if len(prompt) > 8 * limits.max_prompt_tokens:  # cheap bound before tokenizing
            raise RequestError(
                f"'prompt' has {len(prompt)} characters, over this replica's bound of "
                f"{8 * limits.max_prompt_tokens}",
                param="prompt",
                status=413,
            )
    elif isinstance(prompt, list):
        if not prompt:
            raise RequestError("'prompt' is an empty list of token ids", param="prompt")
        if not all(_is_int(token) for token in prompt):
            raise RequestError("'prompt' must be a list of ints (token ids) or a string", param="prompt")
        if len(prompt) > limits.max_prompt_tokens:
            raise RequestError(
                f"'prompt' has {len(prompt)} tokens, over this replica's max_prompt_tokens "
                f"{limits.max_prompt_tokens}",
                param="prompt",
                status=413,
            )
        bad = [token for token in prompt if not 0 <= token < limits.vocab_size]
        if bad:
            raise RequestError(
                f"'prompt' token ids must be in [0, {limits.vocab_size}), got {bad[:5]}", param="prompt"
            )
        reserved = sorted(set(prompt) & set(limits.reserved_ids))
        if reserved:
            raise RequestError(
                f"'prompt' holds placeholder id(s) {reserved}; the server inserts the video/event "
                "placeholders itself",
                param="prompt",
            )
        prompt = tuple(prompt)
    else:
        raise RequestError(
            f"'prompt' must be a list of token ids or a string, got {type(prompt).__name__}", param="prompt"
        )

    max_tokens = body.get("max_tokens", limits.default_max_new_tokens)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError(f"'max_tokens' must be an int >= 1, got {max_tokens!r}", param="max_tokens")
    if max_tokens > limits.max_new_tokens_limit:
        raise RequestError(
            f"'max_tokens' is {max_tokens}, over this replica's max_new_tokens_limit "
            f"{limits.max_new_tokens_limit}",
            param="max_tokens",
            status=413,
        )
    temperature = body.get("temperature", 0.0)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise RequestError(
            f"'temperature' must be a finite number >= 0, got {temperature!r}", param="temperature"
        )
    seed = body.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed < (1 << 63):
        raise RequestError(f"'seed' must be an int in [0, 2**63), got {seed!r}", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}", param="stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {model!r}", param="model")
    attachment = _parse_attachment(body.get("attachment"), limits)
    return CompletionRequest(prompt, max_tokens, float(temperature), seed, stream, attachment)


def _parse_attachment(attachment, limits: Limits) -> dict:
    if limits.synthetic_clips:
        if attachment is None:
            return {"synthetic_clip_seed": 0}
        if not isinstance(attachment, dict) or set(attachment) - set(SYNTHETIC_KEYS):
            raise RequestError(
                f"'attachment' must be {{\"synthetic_clip_seed\": int}} on this server (tiny models), "
                f"got {attachment!r}",
                param="attachment",
            )
        seed = attachment.get("synthetic_clip_seed", 0)
        if not _is_int(seed) or not 0 <= seed < (1 << 31):
            raise RequestError(
                f"'attachment.synthetic_clip_seed' must be an int in [0, 2**31), got {seed!r}",
                param="attachment",
            )
        return {"synthetic_clip_seed": seed}
    if not isinstance(attachment, dict):
        raise RequestError(
            '\'attachment\' is required: {"video": path, "events": path, "window_us": [t0, t1] (optional)}',
            param="attachment",
        )
    unknown = sorted(set(attachment) - set(FILE_KEYS))
    if unknown:
        raise RequestError(
            f"unknown 'attachment' field(s) {unknown}; it takes {list(FILE_KEYS)}", param="attachment"
        )
    for key in ("video", "events"):
        if not isinstance(attachment.get(key), str) or not attachment[key]:
            raise RequestError(f"'attachment.{key}' must be a file path", param="attachment")
    window = attachment.get("window_us")
    if window is not None:
        if not (isinstance(window, list) and len(window) == 2 and all(_is_int(t) for t in window)):
            raise RequestError(
                f"'attachment.window_us' must be [t0, t1] ints, got {window!r}", param="attachment"
            )
        if window[1] <= window[0]:
            raise RequestError(
                f"'attachment.window_us' must have t1 > t0, got {window!r}", param="attachment"
            )
        window = tuple(window)
    return {"video": attachment["video"], "events": attachment["events"], "window_us": window}
