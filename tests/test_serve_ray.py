"""Serving on Ray Serve (issue 15 item 2), on CPU with tiny random models and a local Ray instance.

The module starts its own Ray (2 CPUs, no dashboard, a small object store) and Serve application
with 2 replicas (chain drafts of 2, at most 2 free tokens: a round commits at most 3 tokens), and
stops both in the fixture's ``finally``. What it checks:

* 16 concurrent streamed requests with different prompt lengths, clips and max_tokens, batched by
  ``@serve.batch`` with left padding: every output equals ``target.generate`` for that request alone
  (greedy), and at least one batch held more than one request;
* a replica killed (``ray.kill``) while requests are in flight loses none of them: the client
  retries (at least one retry must have happened) and the tokens still equal ``target.generate``;
* the same over HTTP (through the ingress deployment): 16 concurrent HTTP requests, half of them
  streamed (server-sent events), with a replica killed mid-run: every response is complete and
  equals ``target.generate``, the ingress retried at least once, and a bad request sent right after
  the kill still gets 400 while the others are served;
* (no Ray) the ingress with a scripted engine handle: a stream cut by a dead replica resumes without
  repeating a token, a retry that disagrees ends the stream with an error event and never sends the
  wrong token, a RequestError is answered with its status and never retried, retries stop at
  ``max_retries``; the Python client checks a replay the same way;
* wrong schema and oversized requests get a clear error (handle: RequestError; HTTP: 400 / 413)
  and the server keeps answering other requests correctly, over the handle and over HTTP;
* streaming is per engine round: a 12-token answer comes in >= 4 chunks of <= 3 tokens, no more
  chunks than rounds, and the chunks arrive while the engine is still generating (the first one
  well before the last);
* sampled requests (coupled sampling) of one temperature run batched with per-row seeds, and each
  equals ``target.generate`` with ``CoupledSampling(seed, T, prompt_width)`` for that request alone,
  so same-seed requests get the same tokens whatever shares their batch;
* (no Ray) the worker groups a batch by temperature, passes per-row seeds and
  ``sampling="coupled"``, and a group that fails mid-stream reruns its requests one by one without
  sending a token twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from starlette.requests import Request
from starlette.responses import StreamingResponse
from transformers import LogitsProcessorList

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'ray[serve]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]')")

import torch  # noqa: E402
from ray.exceptions import RayTaskError  # noqa: E402

from crossspec_kernels.runtime.sampling import CoupledSampling  # noqa: E402
from crossspec_kernels.serving.config import DraftSettings, ServeConfig  # noqa: E402
from crossspec_kernels.serving.deployment import (  # noqa: E402
    DEPLOYMENT_NAME,
    INGRESS_NAME,
    CrossSpecClient,
    CrossSpecIngress,
    ReplayMismatch,
    run,
)
from crossspec_kernels.serving.schema import Limits, RequestError, parse_request  # noqa: E402
from crossspec_kernels.serving.worker import (  # noqa: E402
    EngineWorker,
    Prepared,
    build_tiny_models,
    tiny_inputs,
)

NUM_REQUESTS = 16
DRAFT = DraftSettings(kind="chain", gamma=2, free_token_budget=2)
MAX_PER_ROUND = max(DRAFT.gamma, DRAFT.free_token_budget) + 1  # drafts accepted + the target's token


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _body(n: int) -> dict:
    """Request n: prompts of 2..7 tokens (so batches are left padded), its own clip and length."""
    gen = torch.Generator().manual_seed(1000 + n)
    prompt = torch.randint(3, 100, (2 + n % 6,), generator=gen).tolist()
    return {"prompt": prompt, "max_tokens": 4 + n % 5, "attachment": {"synthetic_clip_seed": n}}


@pytest.fixture(scope="module")
def reference():
    """tokens(body): target.generate's new tokens for that request alone: greedy, or for a sampled
    request the target sampling alone under the coupled race (CoupledSampling)."""
    target, drafter = build_tiny_models(0)

    def tokens(body: dict) -> list[int]:
        target_inputs, _ = tiny_inputs(
            drafter.config, body["prompt"], body["attachment"]["synthetic_clip_seed"], backend="reference"
        )
        width = target_inputs["input_ids"].shape[1]
        processors = None
        if body.get("temperature", 0) > 0:
            processors = LogitsProcessorList([CoupledSampling(body["seed"], body["temperature"], width)])
        with torch.no_grad():
            out = target.generate(
                **target_inputs,
                max_new_tokens=body["max_tokens"],
                do_sample=False,
                logits_processor=processors,
            )
        return out[0, width:].tolist()

    return tokens


@pytest.fixture(scope="module")
def served():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    config = ServeConfig(
        tiny=True,
        num_replicas=2,
        max_batch_size=4,
        batch_wait_timeout_s=0.25,
        max_new_tokens_limit=12,
        default_max_new_tokens=6,
        max_prompt_tokens=16,
        draft=DRAFT,
        max_retries=8,
        retry_wait_s=0.5,
        port=_free_port(),
    )
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024, log_to_driver=False)
    try:
        handle = run(config)
        yield config, handle
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(config: ServeConfig, payload: bytes) -> tuple[int, str]:
    url = f"http://{config.host}:{config.port}{config.route_prefix}"
    request = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _sse_chunks(text: str) -> list[dict]:
    """The JSON events of a server-sent-events answer, which must end with [DONE]."""
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text
    return [json.loads(event) for event in events[:-1]]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(served, reference):
    config, handle = served
    client = CrossSpecClient(handle)
    assert handle.check_health.remote().result(timeout_s=60) is None
    good = _body(3)
    with pytest.raises(RequestError, match=r"unknown field\(s\) \['max_new_token'\]"):
        client.complete({**good, "max_new_token": 4})
    with pytest.raises(RequestError, match="'prompt' must be a list of token ids or a string"):
        client.complete({**good, "prompt": {"ids": [1, 2]}})
    with pytest.raises(RequestError, match="no tokenizer"):
        client.complete({**good, "prompt": "what moves?"})
    with pytest.raises(RequestError, match="over this replica's max_new_tokens_limit 12") as oversized:
        client.complete({**good, "max_tokens": 13})
    assert oversized.value.status == 413
    with pytest.raises(RequestError, match="over this replica's max_prompt_tokens 16"):
        client.complete({**good, "prompt": list(range(3, 20))})
    with pytest.raises(RequestError, match="placeholder"):
        client.complete({**good, "prompt": [5, 127]})
    # Still serving, correctly.
    assert client.complete(good)["choices"][0]["token_ids"] == reference(good)

    status, text = _post(config, b"{not json")
    assert status == 400 and "not JSON" in json.loads(text)["error"]["message"]
    status, text = _post(config, json.dumps({**good, "temperature": -1}).encode())
    assert status == 400 and json.loads(text)["error"]["param"] == "temperature"
    status, text = _post(config, json.dumps({**good, "max_tokens": 100}).encode())
    assert status == 413 and json.loads(text)["error"]["type"] == "request_too_large"
    status, text = _post(config, json.dumps(good).encode())
    assert status == 200, text
    response = json.loads(text)
    assert response["object"] == "text_completion"
    assert response["choices"][0]["token_ids"] == reference(good)
    assert response["usage"]["completion_tokens"] == len(reference(good))
    status, text = _post(config, json.dumps({**good, "stream": True}).encode())
    assert status == 200
    chunks = _sse_chunks(text)
    assert [t for chunk in chunks for t in chunk["choices"][0]["token_ids"]] == reference(good)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_streaming_sends_each_round_as_it_commits(served, reference):
    _, handle = served
    client = CrossSpecClient(handle)
    body = {**_body(1), "max_tokens": 12}
    want = reference(body)
    assert len(want) == 12, "this request ends early on the tiny target: pick one with a long answer"
    start = time.perf_counter()
    arrivals, chunks, final = [], [], None
    for chunk in client.stream(body):
        arrivals.append(time.perf_counter() - start)
        if chunk["choices"][0]["finish_reason"] is not None:
            final = chunk
        else:
            chunks.append(chunk["choices"][0]["token_ids"])
    assert [token for chunk in chunks for token in chunk] == want
    assert len(chunks) >= -(-len(want) // MAX_PER_ROUND), chunks
    assert all(1 <= len(chunk) <= MAX_PER_ROUND for chunk in chunks), chunks
    assert len(chunks) <= final["crossspec"]["rounds"]  # one chunk per round at most
    # Sent as rounds commit, not all at the end of the engine call: the first token chunk arrives
    # a good part of the engine's time before the final chunk (buffered chunks would come within a
    # few ms of each other).
    engine_s = final["crossspec"]["engine_ms"] / 1e3
    spread = arrivals[-1] - arrivals[0]
    print(
        f"\nstream: {len(chunks)} chunks {[len(c) for c in chunks]}, first after {arrivals[0]:.2f} s, "
        f"last after {arrivals[-1]:.2f} s, engine {engine_s:.2f} s, {final['crossspec']['rounds']} rounds"
    )
    assert spread > 0.3 * engine_s, (arrivals, engine_s)


def test_sampled_requests_batch_and_equal_the_coupled_target_sampler(served, reference):
    _, handle = served
    client = CrossSpecClient(handle)
    # Sharp temperatures: the tiny models' logits are nearly flat (std ~0.17), so near T = 1 the
    # seed's noise alone would pick the tokens and the prompt would hardly matter.
    sampled = [
        {**_body(n), "max_tokens": 8, "temperature": temperature, "seed": seed}
        for n, temperature, seed in ((5, 0.05, 11), (2, 0.05, 12), (3, 0.05, 2**62 + 5), (4, 0.1, 11))
    ]
    bodies = [*sampled, sampled[0], _body(1)]  # a copy of the first, and a greedy request beside them
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(client.complete, body) for body in bodies]
        outputs = [future.result(timeout=150) for future in futures]
    for body, output in zip(bodies, outputs):
        assert output["choices"][0]["token_ids"] == reference(body), body
    assert (
        outputs[0]["choices"][0]["token_ids"] != outputs[3]["choices"][0]["token_ids"]
    )  # prompt and T matter
    assert all(output["crossspec"]["sampling"] == "coupled" for output in outputs[:5])
    assert outputs[5]["crossspec"]["sampling"] == "greedy"
    sizes = [output["crossspec"]["batch_size"] for output in outputs[:5]]
    print(f"\nsampled: engine-call sizes {sizes}")
    assert max(sizes) > 1, "no two sampled requests shared an engine call"


class _FakeEngine:
    """Stands in for CrossSpecEngine in the worker: row r's token i is 10 * (last prompt id) + i,
    committed two per round; a call with several rows fails after its first round."""

    def __init__(self) -> None:
        self.calls = []

    def generate(self, target_inputs, drafter_inputs, *, max_new_tokens, temperature, on_commit, **kwargs):
        last = target_inputs["input_ids"][:, -1].tolist()
        self.calls.append((len(last), temperature, kwargs))
        rows = [[10 * token + i for i in range(max_new_tokens)] for token in last]
        for start in range(0, max_new_tokens, 2):
            for row, tokens in enumerate(rows):
                on_commit(row, tokens[start : start + 2])
            if len(rows) > 1:
                raise RuntimeError("the batch failed")
        stats = {"sampling": "coupled" if temperature else "greedy", "acceptance_rate": 0.0}
        stats.update(mean_accepted_length=0.0, rounds=len(range(0, max_new_tokens, 2)), fallback=False)
        return type("Out", (), {"sequences": torch.tensor(rows), "stats": stats})()


def test_worker_groups_by_temperature_and_reruns_without_resending():
    worker = object.__new__(EngineWorker)  # no models: the engine is a fake
    worker.engine, worker.eos_ids, worker.batches_run, worker.healthy_error = _FakeEngine(), {93}, 0, None
    bodies = [
        {"prompt": [5], "max_tokens": 5},
        {"prompt": [7], "max_tokens": 3, "temperature": 0.7, "seed": 4},
        {"prompt": [9], "max_tokens": 6, "temperature": 0.7, "seed": 8},  # token 93 ends it (eos)
        {"prompt": [6], "max_tokens": 2, "temperature": 0.2, "seed": 1},
    ]
    limits = Limits(
        max_new_tokens_limit=8,
        default_max_new_tokens=4,
        max_prompt_tokens=4,
        vocab_size=128,
        synthetic_clips=True,
    )
    prepared = []
    for body in bodies:
        ids = torch.tensor([body["prompt"]])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        prepared.append(Prepared(parse_request(body, limits), inputs, dict(inputs), 1))
    sent: dict[int, list[int]] = {n: [] for n in range(len(bodies))}
    results = worker.run_batch(prepared, lambda n, tokens: sent[n].extend(tokens))
    assert [r.token_ids for r in results] == [[50, 51, 52, 53, 54], [70, 71, 72], [90, 91, 92, 93], [60, 61]]
    assert [r.finish_reason for r in results] == ["length", "length", "stop", "length"]
    assert sent == {n: r.token_ids for n, r in enumerate(results)}  # every token once, in order
    # One call per temperature; the 0.7 pair failed as a batch after its first round and reran alone.
    calls = worker.engine.calls
    assert calls[0] == (1, 0.0, {})
    assert calls[1] == (2, 0.7, {"seed": [4, 8], "sampling": "coupled"})
    assert calls[2:] == [
        (1, 0.7, {"seed": [4], "sampling": "coupled"}),
        (1, 0.7, {"seed": [8], "sampling": "coupled"}),
        (1, 0.2, {"seed": [1], "sampling": "coupled"}),
    ]


def _replica_actors() -> dict[str, object]:
    """{replica unique id: actor handle} of the running Serve replicas."""
    actors = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if name.startswith("SERVE_REPLICA::") and f"#{DEPLOYMENT_NAME}#" in name:  # not the ingress
            actors[name.rsplit("#", 1)[-1]] = ray.get_actor(name, namespace=entry["namespace"])
    return actors


def test_concurrent_requests_equal_target_generate_and_survive_a_killed_replica(served, reference):
    _, handle = served
    client = CrossSpecClient(handle, max_retries=8, retry_wait_s=0.5)
    bodies = [_body(n) for n in range(NUM_REQUESTS)]
    expected = [reference(body) for body in bodies]
    finished_on: list[str] = []
    first_done = threading.Event()

    def call(body: dict) -> tuple[list[int], dict, float]:
        start = time.perf_counter()
        tokens, final = [], None
        for chunk in client.stream(body):
            tokens += chunk["choices"][0]["token_ids"]
            final = chunk
        finished_on.append(final["crossspec"]["replica"])
        first_done.set()
        return tokens, final, time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(NUM_REQUESTS) as pool:
        futures = [pool.submit(call, body) for body in bodies]
        assert first_done.wait(timeout=150), "no request finished within 150 s"
        actors = _replica_actors()
        assert len(actors) == 2, actors
        # Kill the replica that has not finished a request yet (if both have, either one): it has
        # accepted requests in flight.
        victim = next((rid for rid in actors if rid not in finished_on), next(iter(actors)))
        ray.kill(actors[victim], no_restart=True)
        results = [future.result(timeout=170) for future in futures]
    seconds = time.perf_counter() - start

    for body, want, (tokens, final, _) in zip(bodies, expected, results):
        assert tokens == want, body
        assert final["usage"]["completion_tokens"] == len(want)
    assert client.retries >= 1, "the killed replica had no request in flight: the kill tested nothing"
    assert max(final["crossspec"]["batch_size"] for _, final, _ in results) > 1
    latencies = sorted(latency for _, _, latency in results)
    print(
        f"\nserve: {NUM_REQUESTS} requests in {seconds:.1f} s ({NUM_REQUESTS / seconds:.2f} req/s), "
        f"latency p50 {latencies[len(latencies) // 2]:.1f} s, max {latencies[-1]:.1f} s, "
        f"retries {client.retries}, batch sizes {sorted(final['crossspec']['batch_size'] for _, final, _ in results)}"
    )


def _wait_for_replicas(config: ServeConfig, count: int, timeout_s: float = 120) -> None:
    """Until the engine deployment has ``count`` running replicas (a killed one is replaced)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        deployment = serve.status().applications[config.app_name].deployments[DEPLOYMENT_NAME]
        states = {str(getattr(state, "value", state)): n for state, n in deployment.replica_states.items()}
        if states.get("RUNNING", 0) == count and len(states) == 1 and len(_replica_actors()) == count:
            return
        time.sleep(0.5)
    raise AssertionError(f"the engine deployment has not {count} running replicas after {timeout_s} s")


def test_http_requests_survive_a_killed_replica(served, reference):
    config, _ = served
    _wait_for_replicas(config, 2)  # the previous test killed one
    ingress = serve.get_deployment_handle(INGRESS_NAME, app_name=config.app_name)
    retries_before = ingress.info.remote().result(timeout_s=30)["retries"]
    bodies = [{**_body(n), "stream": n % 2 == 1} for n in range(NUM_REQUESTS)]
    expected = [reference(body) for body in bodies]
    finished_on: list[str] = []
    first_done = threading.Event()

    def call(body: dict) -> tuple[list[int], dict]:
        status, text = _post(config, json.dumps(body).encode())
        assert status == 200, text
        if body["stream"]:
            chunks = _sse_chunks(text)
            assert all("error" not in chunk for chunk in chunks), chunks
            tokens = [token for chunk in chunks for token in chunk["choices"][0]["token_ids"]]
            final = chunks[-1]
        else:
            final = json.loads(text)
            tokens = final["choices"][0]["token_ids"]
        finished_on.append(final["crossspec"]["replica"])
        first_done.set()
        return tokens, final

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(NUM_REQUESTS + 1) as pool:
        futures = [pool.submit(call, body) for body in bodies]
        assert first_done.wait(timeout=150), "no HTTP request finished within 150 s"
        actors = _replica_actors()
        assert len(actors) == 2, actors
        victim = next((rid for rid in actors if rid not in finished_on), next(iter(actors)))
        ray.kill(actors[victim], no_restart=True)
        bad = pool.submit(_post, config, json.dumps({**bodies[0], "temperature": -1}).encode())
        results = [future.result(timeout=170) for future in futures]
        status, text = bad.result(timeout=60)
    seconds = time.perf_counter() - start

    assert status == 400 and json.loads(text)["error"]["param"] == "temperature", text
    for body, want, (tokens, final) in zip(bodies, expected, results):
        assert tokens == want, body
        assert final["usage"]["completion_tokens"] == len(want), body
        assert final["choices"][0]["finish_reason"] in ("stop", "length")
    retried = [final["crossspec"]["retries"] for _, final in results]
    ingress_retries = ingress.info.remote().result(timeout_s=30)["retries"] - retries_before
    print(
        f"\nhttp: {NUM_REQUESTS} requests ({NUM_REQUESTS // 2} streamed) in {seconds:.1f} s, "
        f"killed replica {victim}, retries per request {retried}, ingress retries {ingress_retries}"
    )
    assert sum(retried) >= 1, "no HTTP request was in flight on the killed replica: the kill tested nothing"
    assert ingress_retries >= sum(retried)  # the bad request may have been retried too
    assert victim not in {
        final["crossspec"]["replica"] for _, final in results if final["crossspec"]["retries"]
    }


# ----------------------------------------------------------------------------------------------
# The ingress's retries against a scripted engine handle (no Ray)
# ----------------------------------------------------------------------------------------------


def _chunk(tokens: list[int], finish_reason: str | None = None) -> dict:
    chunk = {"id": "cmpl-test", "object": "text_completion.chunk", "created": 0, "model": "fake"}
    chunk["choices"] = [{"index": 0, "token_ids": tokens, "text": None, "finish_reason": finish_reason}]
    if finish_reason is not None:
        chunk["usage"] = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        chunk["crossspec"] = {"replica": "fake"}
    return chunk


class _Attempt:
    """One call of the scripted handle: its chunks, then its error (if any); sync or async."""

    def __init__(self, chunks: list[dict], error: Exception | None) -> None:
        self.chunks, self.error = chunks, error

    def __iter__(self):
        yield from self.chunks
        if self.error is not None:
            raise self.error

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error


class _ScriptedEngine:
    """Stands in for the engine deployment's handle: call i answers script[i] = (chunks, error)."""

    def __init__(self, script: list[tuple[list[dict], Exception | None]]) -> None:
        self.script, self.calls = script, 0

    def options(self, **kwargs):
        assert kwargs == {"stream": True}
        return self

    @property
    def stream(self):
        return self

    def remote(self, body: dict) -> _Attempt:
        chunks, error = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return _Attempt(chunks, error)


def _http(ingress, body: dict) -> tuple[int, str]:
    """(status, body text) of the ingress's answer to ``POST body``."""

    async def call() -> tuple[int, str]:
        payload = json.dumps(body).encode()

        async def receive() -> dict:
            return {"type": "http.request", "body": payload, "more_body": False}

        response = await ingress(Request({"type": "http", "method": "POST", "headers": []}, receive))
        if isinstance(response, StreamingResponse):
            return response.status_code, "".join([piece async for piece in response.body_iterator])
        return response.status_code, response.body.decode()

    return asyncio.run(call())


DIED = ray.exceptions.ActorDiedError  # what a killed replica's caller gets (a RayActorError)


def test_ingress_retries_replay_checks_and_never_retries_a_wrong_request():
    config = ServeConfig(tiny=True, max_retries=2, retry_wait_s=0.0).to_dict()
    final = _chunk([], "length")
    cut = [([_chunk([1, 2]), _chunk([3])], DIED()), ([_chunk([1, 2, 3]), _chunk([4]), final], None)]

    # A stream cut by a dead replica resumes on the next without repeating a token.
    ingress = CrossSpecIngress.func_or_class(_ScriptedEngine(cut), config)
    status, text = _http(ingress, {"prompt": [5], "stream": True})
    chunks = _sse_chunks(text)
    assert status == 200 and [c["choices"][0]["token_ids"] for c in chunks] == [[1, 2], [3], [4], []]
    assert chunks[-1]["crossspec"] == {"replica": "fake", "retries": 1}
    status, text = _http(ingress, {"prompt": [5]})  # the script's last entry answers at once
    assert status == 200 and json.loads(text)["choices"][0]["token_ids"] == [1, 2, 3, 4]
    assert ingress.info() == {"requests": 2, "retries": 1, "max_retries": 2, "retry_wait_s": 0.0}
    engine = _ScriptedEngine(cut)
    status, text = _http(CrossSpecIngress.func_or_class(engine, config), {"prompt": [5]})
    assert status == 200 and json.loads(text)["choices"][0]["token_ids"] == [1, 2, 3, 4]
    assert json.loads(text)["crossspec"]["retries"] == 1 and engine.calls == 2

    # A retry that disagrees (or stops short) ends the stream with an error event: no wrong token.
    for retry in ([_chunk([1, 9, 3]), final], [_chunk([1]), final]):
        ingress = CrossSpecIngress.func_or_class(_ScriptedEngine([cut[0], (retry, None)]), config)
        status, text = _http(ingress, {"prompt": [5], "stream": True})
        chunks = _sse_chunks(text)
        assert status == 200 and [c["choices"][0]["token_ids"] for c in chunks[:-1]] == [[1, 2], [3]]
        assert (
            chunks[-1]["error"]["type"] == "server_error"
            and "ReplayMismatch" in chunks[-1]["error"]["message"]
        )
        ingress = CrossSpecIngress.func_or_class(_ScriptedEngine([cut[0], (retry, None)]), config)
        status, text = _http(ingress, {"prompt": [5]})  # not streamed: 500, no tokens
        assert status == 500 and "ReplayMismatch" in json.loads(text)["error"]["message"], text

    # A wrong request is answered with its status and never retried.
    oversized = RayTaskError(
        "stream", "", RequestError("max_tokens 99 over 12", param="max_tokens", status=413)
    )
    for stream in (False, True):
        engine = _ScriptedEngine([([], oversized)])
        status, text = _http(
            CrossSpecIngress.func_or_class(engine, config), {"prompt": [5], "stream": stream}
        )
        assert (status, json.loads(text)["error"]["param"], engine.calls) == (413, "max_tokens", 1)

    # Retries stop at max_retries: the answer is a 500, after 1 + 2 calls.
    engine = _ScriptedEngine([([], DIED())])
    status, text = _http(CrossSpecIngress.func_or_class(engine, config), {"prompt": [5]})
    assert status == 500 and "ActorDiedError" in json.loads(text)["error"]["message"] and engine.calls == 3

    # The Python client drives the same RetryState: same replay, same check.
    client = CrossSpecClient(_ScriptedEngine(cut), retry_wait_s=0.0)
    assert client.complete({"prompt": [5]})["choices"][0]["token_ids"] == [1, 2, 3, 4] and client.retries == 1
    client = CrossSpecClient(_ScriptedEngine([cut[0], ([_chunk([1, 9, 3]), final], None)]), retry_wait_s=0.0)
    with pytest.raises(ReplayMismatch, match="gave token 9 at position 1, not the 2 already delivered"):
        client.complete({"prompt": [5]})
