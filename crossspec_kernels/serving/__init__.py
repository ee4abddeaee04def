"""Serving the engine on Ray Serve: one ``CrossSpecEngine`` per replica, dynamic batching.

``config``     ServeConfig: models (folders, or ``"tiny": true``), limits, batching, draft settings.
``schema``     The request/response JSON schema (OpenAI-completions-like) and its validation.
``worker``     EngineWorker: builds the engine of one replica and runs a batch of requests.
``deployment`` The Ray Serve deployment (HTTP + Python handle), ``build_app``, ``CrossSpecClient``.
``cli``        ``crossspec serve CONFIG.json``.

``config`` and ``schema`` need the standard library only; ``worker`` imports torch, ``deployment``
imports ray. Nothing here is imported by ``import crossspec_kernels``.
"""
