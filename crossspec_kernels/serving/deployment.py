"""The Ray Serve application: one CrossSpecEngine per replica, dynamic batching, token streaming,
an HTTP ingress that retries a request whose replica died.

Python::

    import ray
    from ray import serve
    from crossspec_kernels.serving.config import ServeConfig
    from crossspec_kernels.serving.deployment import CrossSpecClient, run

    ray.init()
    handle = run(ServeConfig(tiny=True, num_replicas=2))        # the engine deployment; HTTP too
    client = CrossSpecClient(handle)
    client.complete({"prompt": [5, 17, 42], "max_tokens": 8})   # -> response dict (schema.py)
    for chunk in client.stream({"prompt": [5, 17, 42], "max_tokens": 8}):
        print(chunk["choices"][0]["token_ids"])
    serve.shutdown()

The application has two deployments. ``CrossSpecDeployment`` (``DEPLOYMENT_NAME``): each replica
owns one engine (one GPU when the cluster has GPUs) and one ``@serve.batch`` queue
(``max_batch_size``, ``batch_wait_timeout_s`` from the config); requests are validated and their clips
preprocessed before they join a batch, so a bad request fails alone. ``CrossSpecIngress``
(``INGRESS_NAME``, no engine, ``ingress_cpus``): owns the HTTP route, ``POST {route_prefix}`` with the
JSON of ``schema.py`` (``"stream": true`` answers with server-sent events), and forwards each request
to the engine replicas through a ``DeploymentHandle``.

Streaming: the engine runs in a worker thread and hands over each round's committed tokens
(``generate(on_commit=...)``) through ``loop.call_soon_threadsafe``, so a request gets one chunk per
engine round that committed tokens for it, as the round ends, and a last chunk with the finish
reason and usage once its engine call returns.

Replica failures: a request whose replica dies is lost to Ray (Serve retries only requests not yet
sent to a replica), so the two callers retry it on another replica: ``CrossSpecClient`` (the Python
handle API, sync) and the ingress (HTTP, async). Both drive one ``RetryState`` per request, which
holds the policy (retry ``RETRYABLE_ERRORS`` at most ``max_retries`` times, ``retry_wait_s`` apart;
never a ``RequestError``) and, for a stream, checks that a retry replays the tokens already delivered
and passes on only the new ones (greedy requests, and sampled ones, which use coupled sampling keyed
by their seed, are deterministic whatever their batch). A retry that disagrees ends the request with
an error (HTTP: 500, or an error event in a stream that has begun) rather than wrong tokens. The
final chunk's ``crossspec.retries`` says how many retries the request took;
``CrossSpecClient.retries`` and the ingress's ``info()["retries"]`` count them all.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from crossspec_kernels.serving.config import ServeConfig
from crossspec_kernels.serving.schema import RequestError
from crossspec_kernels.serving.worker import Completion, EngineWorker, Prepared

DEPLOYMENT_NAME = "CrossSpec"
INGRESS_NAME = "CrossSpecIngress"
# The ingress only awaits the replicas: it may hold many requests (the engine handle queues those
# the replicas cannot take yet).
INGRESS_MAX_ONGOING_REQUESTS = 1024
# Errors that mean "the replica went away", not "the request is wrong": worth a retry elsewhere.
RETRYABLE_ERRORS = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class _Failure:
    """A request's own error travelling through the batch generator (a slot cannot raise alone)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=5, health_check_timeout_s=60)
class CrossSpecDeployment:
    """One replica: an EngineWorker behind a ``@serve.batch`` queue.

    Handle methods: ``stream(body)`` (a generator of chunks: call with ``.options(stream=True)``),
    ``complete(body)`` (the whole response), ``info()``. HTTP reaches it through CrossSpecIngress."""

    def __init__(self, config: dict) -> None:
        self.config = ServeConfig.from_dict(config)
        self.worker = EngineWorker(self.config)
        self._batched.set_max_batch_size(self.config.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self.replica = serve.get_replica_context().replica_id.unique_id

    def check_health(self) -> None:
        """Serve calls this every few seconds; raising marks the replica unhealthy (it is replaced)."""
        if self.worker.healthy_error is not None:
            raise RuntimeError(f"replica {self.replica}: device failed: {self.worker.healthy_error}")

    def info(self) -> dict:
        limits = self.worker.limits
        return {
            "replica": self.replica,
            "model": self.worker.model_name,
            "device": str(self.worker.device),
            "batches_run": self.worker.batches_run,
            "max_batch_size": self.config.max_batch_size,
            "batch_wait_timeout_s": self.config.batch_wait_timeout_s,
            "max_new_tokens_limit": limits.max_new_tokens_limit,
            "max_prompt_tokens": limits.max_prompt_tokens,
        }

    # batching ----------------------------------------------------------------------------------
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)  # both reset from the config in __init__
    async def _batched(self, prepared: list[Prepared]):
        """Yields, per step, one item per request: a list of new token ids (what the engine's last
        rounds committed for it), None (nothing new for it in this step), then its Completion or a
        _Failure, then StopIteration. The engine runs in a thread, so health checks and new
        requests are answered while it works; its commits come back through a queue."""
        loop = asyncio.get_running_loop()
        commits: asyncio.Queue = asyncio.Queue()

        def on_tokens(n: int, tokens: list[int]) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(commits.put_nowait, (n, tokens))

        def work() -> list[Completion | Exception]:
            try:
                return self.worker.run_batch(prepared, on_tokens)
            finally:  # queued after every commit of the run
                loop.call_soon_threadsafe(commits.put_nowait, None)

        running = asyncio.ensure_future(asyncio.to_thread(work))
        ended = False
        while not ended:
            step: list[list[int] | None] = [None] * len(prepared)
            commit = await commits.get()
            while True:  # everything that has arrived goes out in one step
                if commit is None:
                    ended = True
                    break
                n, tokens = commit
                step[n] = (step[n] or []) + tokens
                if commits.empty():
                    break
                commit = commits.get_nowait()
            if any(item is not None for item in step):
                yield step
        results = await running
        yield [_Failure(result) if isinstance(result, Exception) else result for result in results]
        yield [StopIteration] * len(prepared)

    async def _admit(self, body) -> Prepared:
        """Validation and preprocessing of one request, before it joins a batch (RequestError)."""
        request = self.worker.parse(body)
        return await asyncio.to_thread(self.worker.prepare, request)

    async def _chunks(self, prepared: Prepared) -> AsyncIterator[dict]:
        completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        head = {"id": completion_id, "object": "text_completion.chunk", "created": created}
        head["model"] = self.worker.model_name
        tokens: list[int] = []
        text = ""
        async for item in self._batched(prepared):
            if item is None:  # a step of the batch with nothing new for this request
                continue
            if isinstance(item, _Failure):
                raise item.error
            if isinstance(item, Completion):
                usage = {"prompt_tokens": item.prompt_tokens, "completion_tokens": len(item.token_ids)}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield {
                    **head,
                    "choices": [
                        {"index": 0, "token_ids": [], "text": None, "finish_reason": item.finish_reason}
                    ],
                    "usage": usage,
                    "crossspec": {"replica": self.replica, "batch_size": item.batch_size, **item.stats},
                }
                continue  # the batch generator ends this stream next (returning early leaves its future unread)
            tokens += item
            piece = None
            decoded = self.worker.decode(tokens)
            if decoded is not None:
                piece, text = decoded[len(text) :], decoded
            yield {
                **head,
                "choices": [{"index": 0, "token_ids": list(item), "text": piece, "finish_reason": None}],
            }

    # handle API --------------------------------------------------------------------------------
    async def stream(self, body: dict) -> AsyncIterator[dict]:
        """Chunks of one completion: one per engine round that committed tokens for it (as the round
        ends), then a last one with no tokens, the finish reason and usage."""
        prepared = await self._admit(body)
        async for chunk in self._chunks(prepared):
            yield chunk

    async def complete(self, body: dict) -> dict:
        """The whole completion (schema.py's response)."""
        return await collect(self._chunks(await self._admit(body)), self.worker.decode)


def _server_error(error: Exception) -> dict:
    return {"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error", "param": None}}


def _merge(chunks: list[dict], decode=None) -> dict:
    """The response of a finished stream of chunks."""
    final = chunks[-1]
    tokens = [token for chunk in chunks for token in chunk["choices"][0]["token_ids"]]
    pieces = [chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"][0]["text"] is not None]
    text = decode(tokens) if decode is not None else ("".join(pieces) if pieces else None)
    choice = {
        "index": 0,
        "token_ids": tokens,
        "text": text,
        "finish_reason": final["choices"][0]["finish_reason"],
    }
    return {**final, "object": "text_completion", "choices": [choice]}


async def collect(chunks: AsyncIterator[dict], decode=None) -> dict:
    return _merge([chunk async for chunk in chunks], decode)


# ----------------------------------------------------------------------------------------------
# Retries: one policy and replay check, driven by the sync client and the async ingress
# ----------------------------------------------------------------------------------------------


class ReplayMismatch(RuntimeError):
    """A retried request did not replay the tokens already delivered (it is never retried again)."""


class RetryState:
    """One request across its attempts; the callers only do the I/O::

        state = RetryState(max_retries, retry_wait_s)
        while True:
            state.begin()
            try:
                for chunk in <a new stream of the request>:
                    if (fresh := state.accept(chunk)) is not None:
                        <pass fresh on>
                    if state.finished:
                        return
                state.end_of_stream()
            except Exception as error:
                <sleep state.wait_after(error)>  # raises when the error must not be retried

    ``accept`` checks a retry's replay of the tokens already delivered and returns only what is new
    (or None); the final chunk gets ``crossspec.retries``."""

    def __init__(self, max_retries: int, retry_wait_s: float) -> None:
        self.max_retries = max_retries
        self.retry_wait_s = retry_wait_s
        self.retries = 0
        self.finished = False
        self.delivered: list[int] = []
        self.delivered_text = ""
        self.begin()

    def begin(self) -> None:
        """A new attempt starts: its tokens replay ``delivered`` first."""
        self.seen = 0
        self.attempt_text = ""

    def accept(self, chunk: dict) -> dict | None:
        choice = chunk["choices"][0]
        if choice["finish_reason"] is not None:
            if self.seen < len(self.delivered):
                raise ReplayMismatch(
                    f"crossspec: the retried request ended after {self.seen} tokens, "
                    f"{len(self.delivered)} were already delivered"
                )
            self.finished = True
            return {**chunk, "crossspec": {**chunk.get("crossspec", {}), "retries": self.retries}}
        fresh = []
        for token in choice["token_ids"]:
            if self.seen < len(self.delivered):  # a retry replays what the caller already has
                if token != self.delivered[self.seen]:
                    raise ReplayMismatch(
                        f"crossspec: the retried request gave token {token} at position {self.seen}, "
                        f"not the {self.delivered[self.seen]} already delivered"
                    )
            else:
                self.delivered.append(token)
                fresh.append(token)
            self.seen += 1
        text = None
        if choice["text"] is not None:
            self.attempt_text += choice["text"]
            text = self.attempt_text[len(self.delivered_text) :]
            self.delivered_text += text
        if fresh or text:
            return {**chunk, "choices": [{**choice, "token_ids": fresh, "text": text}]}
        return None

    def end_of_stream(self) -> None:
        if not self.finished:
            raise RuntimeError("crossspec: the stream ended without its final chunk")

    def wait_after(self, error: Exception) -> float:
        """Seconds to wait before the next attempt; raises the error (a RequestError as itself) when
        it must not be retried: a wrong request, an engine failure, a replay mismatch, or the last
        retry spent."""
        if isinstance(error, RayTaskError) and isinstance(error.cause, RequestError):
            raise error.cause from None
        if not isinstance(error, RETRYABLE_ERRORS) or self.retries >= self.max_retries:
            raise error
        self.retries += 1
        return self.retry_wait_s


class CrossSpecClient:
    """The Python handle API with retries: a request whose replica dies runs again on another.

    ``retries`` counts the retries made (all requests together). RequestError (a wrong or oversized
    request) is raised as itself, never retried."""

    def __init__(self, handle, *, max_retries: int = 5, retry_wait_s: float = 0.5) -> None:
        self.handle = handle
        self.max_retries = max_retries
        self.retry_wait_s = retry_wait_s
        self.retries = 0

    def complete(self, body: dict) -> dict:
        return _merge(list(self.stream(body)))

    def stream(self, body: dict) -> Iterator[dict]:
        state = RetryState(self.max_retries, self.retry_wait_s)
        while True:
            state.begin()
            try:
                for chunk in self.handle.options(stream=True).stream.remote(body):
                    fresh = state.accept(chunk)
                    if fresh is not None:
                        yield fresh
                    if state.finished:
                        return
                state.end_of_stream()
            except Exception as error:
                wait = state.wait_after(error)
                self.retries += 1
                time.sleep(wait)


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
class CrossSpecIngress:
    """The HTTP route: parses the JSON, forwards the request to the engine deployment, retries it
    there when its replica dies (``RetryState``, as ``CrossSpecClient``). No engine, no GPU.

    Handle methods: ``stream(body)`` (the retried chunks), ``info()`` (requests and retries)."""

    def __init__(self, engine, config: dict) -> None:
        self.engine = engine  # DeploymentHandle of CrossSpecDeployment
        self.config = ServeConfig.from_dict(config)
        self.requests = 0
        self.retries = 0

    def info(self) -> dict:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "max_retries": self.config.max_retries,
            "retry_wait_s": self.config.retry_wait_s,
        }

    async def stream(self, body: dict) -> AsyncIterator[dict]:
        self.requests += 1
        state = RetryState(self.config.max_retries, self.config.retry_wait_s)
        while True:
            state.begin()
            try:
                async for chunk in self.engine.options(stream=True).stream.remote(body):
                    fresh = state.accept(chunk)
                    if fresh is not None:
                        yield fresh
                    if state.finished:
                        return
                state.end_of_stream()
            except Exception as error:
                wait = state.wait_after(error)
                self.retries += 1
                await asyncio.sleep(wait)

    async def __call__(self, http_request: Request):
        if http_request.method != "POST":
            error = RequestError(f"use POST with a JSON body, got {http_request.method}")
            return JSONResponse(error.to_json(), status_code=405)
        try:
            body = json.loads(await http_request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as decode_error:
            error = RequestError(f"the body is not JSON ({decode_error})")
            return JSONResponse(error.to_json(), status_code=400)
        chunks = self.stream(body)
        try:
            # The replica checks the request before its first chunk: a wrong one is answered with
            # its status, not with a stream that has begun.
            first = await anext(chunks)
            if isinstance(body, dict) and body.get("stream") is True:
                return StreamingResponse(_events(first, chunks), media_type="text/event-stream")
            rest = [chunk async for chunk in chunks]
        except RequestError as error:
            return JSONResponse(error.to_json(), status_code=error.status)
        except Exception as error:  # the engine failed on this request: say so, keep serving
            return JSONResponse(_server_error(error), status_code=500)
        return JSONResponse(_merge([first, *rest]))


async def _events(first: dict, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    yield f"data: {json.dumps(first)}\n\n"
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as error:  # headers are sent: report in the stream, never a wrong token
        yield f"data: {json.dumps(_server_error(error))}\n\n"
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------------
# Building and running the application
# ----------------------------------------------------------------------------------------------


def replica_gpus(config: ServeConfig) -> float:
    """GPUs per replica: the config's number, or for "auto" 1 when the Ray cluster has a GPU, else 0."""
    if config.gpus_per_replica != "auto":
        return float(config.gpus_per_replica)
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def build_app(config: ServeConfig):
    """The bound Serve application (``serve.run(build_app(config))``): the HTTP ingress bound to
    the engine deployment."""
    actor_options: dict = {"num_cpus": config.replica_cpus}
    gpus = replica_gpus(config)
    if gpus > 0:
        actor_options["num_gpus"] = gpus
    engine = CrossSpecDeployment.options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.ongoing_requests,
        ray_actor_options=actor_options,
    ).bind(config.to_dict())
    return CrossSpecIngress.options(ray_actor_options={"num_cpus": config.ingress_cpus}).bind(
        engine, config.to_dict()
    )


def run(config: ServeConfig, *, blocking: bool = False):
    """Starts Serve (HTTP on config.host:config.port) and the application; returns the handle of
    the engine deployment (for ``CrossSpecClient``; the ingress's is
    ``serve.get_deployment_handle(INGRESS_NAME, config.app_name)``).

    Starts a local Ray instance unless one is already initialised (``ray.init(address=...)`` first
    to use a cluster)."""
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=blocking)
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=config.app_name)
