"""The configuration of a CrossSpec serving application, loaded from JSON (standard library only).

Example (tiny random models, as the tests and ``crossspec demo`` use)::

    {"tiny": true, "num_replicas": 2, "max_batch_size": 4, "batch_wait_timeout_s": 0.05,
     "max_new_tokens_limit": 32, "draft": {"kind": "chain", "gamma": 4}}

Real checkpoints: ``"target"``, ``"drafter"`` (and optionally ``"adapter"``) name local folders as
``crossspec generate`` takes them; ``"attachment_root"`` is the only folder whose video/event files
requests may name.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

DRAFT_KINDS = ("chain", "tree")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
BACKENDS = ("auto", "cuda", "triton", "reference")


class ConfigError(ValueError):
    """A bad serving configuration; the message names the field."""


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"serve config: {name} must be an int {bound}, got {value!r}")
    return value


def _check_float(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"serve config: {name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"serve config: {name} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"serve config: {name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _check_keys(where: str, data: dict, cls) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"serve config: {where} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"serve config: unknown key(s) in {where}: {unknown}; known: {sorted(known)}")


@dataclass(frozen=True)
class DraftSettings:
    """``kind`` "chain" (``gamma`` drafts per round) or "tree" (``top_k``, ``depth``, ``max_nodes``)."""

    kind: str = "chain"
    gamma: int = 5
    top_k: int = 3
    depth: int = 4
    max_nodes: int = 16
    free_token_budget: int = 32  # the engine's default: a cap, the prefill's end stops drafting

    def __post_init__(self) -> None:
        _check_choice("draft.kind", self.kind, DRAFT_KINDS)
        for name in ("gamma", "top_k", "depth", "max_nodes", "free_token_budget"):
            _check_int(f"draft.{name}", getattr(self, name), 1)

    @classmethod
    def from_dict(cls, data: dict) -> DraftSettings:
        _check_keys("draft", data, cls)
        return cls(**data)


@dataclass(frozen=True)
class ServeConfig:
    """Everything one serving application needs; every replica builds its engine from it."""

    # Models: "tiny" random models (tiny_seed), or local folders.
    tiny: bool = False
    tiny_seed: int = 0
    target: str | None = None
    drafter: str | None = None
    adapter: str | None = None
    attachment_root: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"
    draft: DraftSettings = field(default_factory=DraftSettings)
    # Replicas: each owns one engine; one GPU each when the cluster has GPUs.
    num_replicas: int = 1
    replica_cpus: float = 1.0
    gpus_per_replica: str | float = "auto"  # "auto": 1 when the Ray cluster has GPUs, else 0
    # Dynamic batching (@serve.batch): at most max_batch_size requests, waiting at most this long.
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05
    max_ongoing_requests: int | None = None  # per replica; None = 2 * max_batch_size
    # Per-request limits: requests above them get a clear error (HTTP 413), nothing else fails.
    max_new_tokens_limit: int = 64
    default_max_new_tokens: int = 16
    max_prompt_tokens: int = 256
    # HTTP: a thin ingress (no engine) owns the route and forwards each request to the replicas,
    # retrying, at most max_retries times retry_wait_s apart, one whose replica died. It reserves
    # ingress_cpus (0 by default, like Serve's own HTTP proxy: it only awaits the replicas).
    ingress_cpus: float = 0.0
    max_retries: int = 5
    retry_wait_s: float = 0.5
    app_name: str = "crossspec"
    route_prefix: str = "/v1/completions"
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        if not isinstance(self.tiny, bool):
            raise ConfigError(f"serve config: tiny must be true or false, got {self.tiny!r}")
        _check_int("tiny_seed", self.tiny_seed, 0)
        if self.tiny:
            given = [name for name in ("target", "drafter", "adapter") if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"serve config: tiny=true builds random models; remove {given}")
        else:
            for name in ("target", "drafter"):
                if not isinstance(getattr(self, name), str) or not getattr(self, name):
                    raise ConfigError(
                        f'serve config: {name} must name a local model folder (or set "tiny": true)'
                    )
        for name in ("adapter", "attachment_root"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"serve config: {name} must be a folder path or null, got {value!r}")
        if not isinstance(self.device, str) or not (
            self.device in DEVICES or self.device.startswith("cuda:")
        ):
            raise ConfigError(f"serve config: device must be auto, cpu, cuda or cuda:i; got {self.device!r}")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("backend", self.backend, BACKENDS)
        if not isinstance(self.draft, DraftSettings):
            raise ConfigError("serve config: draft must be a DraftSettings")
        _check_int("num_replicas", self.num_replicas, 1)
        _check_float("replica_cpus", self.replica_cpus, 0.0, 1024.0)
        if self.gpus_per_replica != "auto":
            _check_float("gpus_per_replica", self.gpus_per_replica, 0.0, 8.0)
        _check_int("max_batch_size", self.max_batch_size, 1, 256)
        _check_float("batch_wait_timeout_s", self.batch_wait_timeout_s, 0.0, 60.0)
        if self.max_ongoing_requests is not None:
            _check_int("max_ongoing_requests", self.max_ongoing_requests, self.max_batch_size)
        _check_int("max_new_tokens_limit", self.max_new_tokens_limit, 1)
        _check_int("default_max_new_tokens", self.default_max_new_tokens, 1, self.max_new_tokens_limit)
        _check_int("max_prompt_tokens", self.max_prompt_tokens, 1)
        _check_float("ingress_cpus", self.ingress_cpus, 0.0, 64.0)
        _check_int("max_retries", self.max_retries, 0)
        _check_float("retry_wait_s", self.retry_wait_s, 0.0, 60.0)
        for name in ("app_name", "host"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"serve config: {name} must be a non-empty string")
        if not isinstance(self.route_prefix, str) or not self.route_prefix.startswith("/"):
            raise ConfigError(f"serve config: route_prefix must start with '/', got {self.route_prefix!r}")
        _check_int("port", self.port, 1, 65535)

    @property
    def ongoing_requests(self) -> int:
        return 2 * self.max_batch_size if self.max_ongoing_requests is None else self.max_ongoing_requests

    @classmethod
    def from_dict(cls, data: dict) -> ServeConfig:
        _check_keys("the config", data, cls)
        data = dict(data)
        if "draft" in data:
            data["draft"] = DraftSettings.from_dict(data["draft"])
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(path: str | Path) -> ServeConfig:
    """A ServeConfig from a JSON file; ConfigError (naming the file and the field) otherwise."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"serve config {str(file)!r}: no such file")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"serve config {str(file)!r}: not readable JSON ({error})") from error
    try:
        return ServeConfig.from_dict(data)
    except TypeError as error:  # e.g. a non-object
        raise ConfigError(f"serve config {str(file)!r}: {error}") from error
