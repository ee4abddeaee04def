"""``crossspec serve CONFIG.json``: the engine on Ray Serve, over HTTP and a Python handle.

Builds the parser with the standard library only (ray, torch and the models are imported when the
command runs). The config (``serving.config``) is read and checked before Ray starts; a bad config,
or ray[serve] not installed, is a usage error (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import time

from crossspec_kernels.cli_common import EXIT_OK, UsageError, add_command, existing_file

PROG = "crossspec serve"


def add_serve_parser(sub) -> argparse.ArgumentParser:
    serve = add_command(
        sub,
        "serve",
        help="serve the engine on Ray Serve (HTTP + Python handle) from a JSON config",
        description=(
            "Start a Ray Serve application: config.num_replicas replicas, each owning one CrossSpecEngine\n"
            "(one GPU each when the Ray cluster has GPUs), with dynamic request batching. HTTP:\n"
            "POST http://HOST:PORT/ROUTE with the JSON schema of crossspec_kernels.serving.schema\n"
            '(e.g. {"prompt": [5, 17, 42], "max_tokens": 8, "stream": true}), answered by a thin\n'
            "ingress that retries a request on another replica when its replica dies\n"
            "(config.max_retries, config.retry_wait_s). Ctrl-C stops it."
        ),
    )
    serve.add_argument(
        "config", metavar="CONFIG.json", help="serving config (crossspec_kernels.serving.config)"
    )
    serve.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (e.g. 'auto' or ray://host:10001); none starts a local Ray instance",
    )
    serve.add_argument("--host", default=None, help="HTTP host, overriding the config's")
    serve.add_argument("--port", type=int, default=None, help="HTTP port, overriding the config's")
    serve.set_defaults(func=run_serve)
    return serve


def _load(args: argparse.Namespace):
    from crossspec_kernels.serving.config import ConfigError, ServeConfig, load_config

    existing_file(args.config, "CONFIG.json")
    try:
        config = load_config(args.config)
        overrides = {key: getattr(args, key) for key in ("host", "port") if getattr(args, key) is not None}
        if overrides:
            config = ServeConfig.from_dict({**config.to_dict(), **overrides})
    except ConfigError as error:
        raise UsageError(str(error)) from None
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise UsageError("ray[serve] is not installed: pip install 'ray[serve]'")
    return config


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise
    import ray
    from ray import serve

    from crossspec_kernels.serving.deployment import run

    def stop(signum, frame):  # SIGTERM (docker stop, systemd) stops like Ctrl-C
        raise KeyboardInterrupt

    ray.init(address=args.address)
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own handler
    try:
        run(config)
        models = "tiny random models" if config.tiny else f"target {config.target}, drafter {config.drafter}"
        print(
            f"{PROG}: {config.num_replicas} replica(s) of {models}, batches of <= {config.max_batch_size} "
            f"(wait <= {config.batch_wait_timeout_s} s), max_tokens <= {config.max_new_tokens_limit}, "
            f"HTTP retries <= {config.max_retries} per request\n"
            f"POST http://{config.host}:{config.port}{config.route_prefix}   (Ctrl-C stops)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"{PROG}: stopping", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    return EXIT_OK
