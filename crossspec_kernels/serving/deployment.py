"""The Ray Serve deployment: one CrossSpecEngine per replica, dynamic batching, token streaming.

Python::

    import ray
    from ray import serve
    from crossspec_kernels.serving.config import ServeConfig
    from crossspec_kernels.serving.deployment import CrossSpecClient, run

    ray.init()
    handle = run(ServeConfig(tiny=True, num_replicas=2))        # HTTP on config.host:config.port too
    client = CrossSpecClient(handle)
    client.complete({"prompt": [5, 17, 42], "max_tokens": 8})   # -> response dict (schema.py)
    for chunk in client.stream({"prompt": [5, 17, 42], "max_tokens": 8}):
        print(chunk["choices"][0]["token_ids"])
    serve.shutdown()

HTTP: ``POST {route_prefix}`` with the JSON of ``schema.py``; ``"stream": true`` answers with
server-sent events. Each replica owns one engine (one GPU when the cluster has GPUs) and one
``@serve.batch`` queue (``max_batch_size``, ``batch_wait_timeout_s`` from the config); requests are
validated and their clips preprocessed before they join a batch, so a bad request fails alone.

Streaming: the engine runs in a worker thread and hands over each round's committed tokens
(``generate(on_commit=...)``) through ``loop.call_soon_threadsafe``, so a request gets one chunk per
engine round that committed tokens for it, as the round ends, and a last chunk with the finish
reason and usage once its engine call returns.

Replica failures: a request whose replica dies is lost to Ray (Serve retries only requests not yet
sent to a replica). ``CrossSpecClient`` retries it on another replica; for a stream it checks that
the tokens it already delivered come again and passes on only the new ones (greedy requests, and
sampled ones, which use coupled sampling keyed by their seed, are deterministic whatever their
batch).
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
    ``complete(body)`` (the whole response), ``info()``; ``__call__`` serves HTTP."""

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

    # HTTP --------------------------------------------------------------------------------------
    async def __call__(self, http_request: Request):
        if http_request.method != "POST":
            error = RequestError(f"use POST with a JSON body, got {http_request.method}")
            return JSONResponse(error.to_json(), status_code=405)
        try:
            body = json.loads(await http_request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as decode_error:
            error = RequestError(f"the body is not JSON ({decode_error})")
            return JSONResponse(error.to_json(), status_code=400)
        try:
            prepared = await self._admit(body)
        except RequestError as error:
            return JSONResponse(error.to_json(), status_code=error.status)
        if prepared.request.stream:
            return StreamingResponse(self._events(prepared), media_type="text/event-stream")
        try:
            chunks = [chunk async for chunk in self._chunks(prepared)]
        except Exception as error:  # the engine failed on this request: say so, keep serving
            return JSONResponse(_server_error(error), status_code=500)
        return JSONResponse(_merge(chunks, self.worker.decode))

    async def _events(self, prepared: Prepared) -> AsyncIterator[str]:
        try:
            async for chunk in self._chunks(prepared):
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as error:  # headers are sent: report in the stream
            yield f"data: {json.dumps(_server_error(error))}\n\n"
        yield "data: [DONE]\n\n"


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
# Building and running the application
# ----------------------------------------------------------------------------------------------


def replica_gpus(config: ServeConfig) -> float:
    """GPUs per replica: the config's number, or for "auto" 1 when the Ray cluster has a GPU, else 0."""
    if config.gpus_per_replica != "auto":
        return float(config.gpus_per_replica)
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def build_app(config: ServeConfig):
    """The bound Serve application (``serve.run(build_app(config))``)."""
    actor_options: dict = {"num_cpus": config.replica_cpus}
    gpus = replica_gpus(config)
    if gpus > 0:
        actor_options["num_gpus"] = gpus
    return CrossSpecDeployment.options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.ongoing_requests,
        ray_actor_options=actor_options,
    ).bind(config.to_dict())


def run(config: ServeConfig, *, blocking: bool = False):
    """Starts Serve (HTTP on config.host:config.port) and the application; returns its handle.

    Starts a local Ray instance unless one is already initialised (``ray.init(address=...)`` first
    to use a cluster)."""
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": config.host, "port": config.port})
    return serve.run(
        build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=blocking
    )


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
        chunks = list(self.stream(body))
        return _merge(chunks)

    def stream(self, body: dict) -> Iterator[dict]:
        delivered: list[int] = []
        delivered_text = ""
        attempt = 0
        while True:
            seen, attempt_text = 0, ""
            try:
                for chunk in self.handle.options(stream=True).stream.remote(body):
                    choice = chunk["choices"][0]
                    if choice["finish_reason"] is not None:
                        yield chunk
                        return
                    fresh = []
                    for token in choice["token_ids"]:
                        if seen < len(delivered):  # a retry replays what the caller already has
                            if token != delivered[seen]:
                                raise RuntimeError(
                                    f"crossspec: the retried request gave token {token} at position {seen}, "
                                    f"not the {delivered[seen]} already delivered"
                                )
                        else:
                            delivered.append(token)
                            fresh.append(token)
                        seen += 1
                    text = None
                    if choice["text"] is not None:
                        attempt_text += choice["text"]
                        text = attempt_text[len(delivered_text) :]
                        delivered_text += text
                    if fresh or text:
                        yield {**chunk, "choices": [{**choice, "token_ids": fresh, "text": text}]}
                raise RuntimeError("crossspec: the stream ended without its final chunk")
            except RayTaskError as error:
                if isinstance(error.cause, RequestError):
                    raise error.cause from None
                raise
            except RETRYABLE_ERRORS:
                attempt += 1
                self.retries += 1
                if attempt > self.max_retries:
                    raise
                time.sleep(self.retry_wait_s)
