"""The ``torch`` backend: ops written as vectorised PyTorch, free of host syncs.

One module per op, the same name as in ``ops/`` and ``triton/``. Unlike ``reference.py`` (the spec,
written to be read), these are written to run: every tensor shape depends only on input shapes,
nothing reads a tensor value on the host, so the same code runs eagerly on any device, inside a
CUDA graph capture and under ``torch.compile(fullgraph=True)``.
"""
