"""The target and the drafter on their own devices: what crosses between them each round, and how.

``CrossSpecEngine`` keeps the target (and a feature head, which reads the target's features) on
the target's device and the event drafter with its adapter on the drafter's: the same GPU,
another GPU (``cuda:1`` beside ``cuda:0``) or the CPU beside a GPU. Per round the drafter's
``Proposal`` (and its finite flag) goes to the target's device and the round's ``Verdict`` (with
the rows still generating and their positions) comes back; the round code calls
:meth:`DevicePair.to_target` / :meth:`DevicePair.to_drafter` unconditionally and the pair decides:

* one device: nothing is copied. With two CUDA streams the receiving stream waits on the sending
  one and the tensors are recorded on the receiving stream (the allocator keeps them alive until
  it is done), which is what the engine did before the pair existed.
* GPU to GPU: a CUDA event recorded on the sending stream, the receiving stream waits on it (no
  device-wide sync), then a peer copy ordered on both streams.
* GPU to CPU: ``non_blocking`` copies into pinned host buffers (torch's caching host allocator)
  on the sending stream, and the host waits on one event recorded after them.
* CPU to GPU: a host copy into pinned buffers, then ``non_blocking`` copies on the receiving
  stream (the caching host allocator keeps each buffer until its copy is done).
* ``copy=True`` (testing) on one device: every tensor is cloned into a separate buffer, so a
  test can check that the target side never reads a drafter-side tensor (or the other way)
  except through the pair.

The pair counts what it moved (``transfers``: calls that moved something, ``tensors``,
``moved_bytes``: the sum of the moved tensors' ``nbytes``); the engine reports it per round.
"""

from __future__ import annotations

import copy as _copy_module

import torch

_OP = "CrossSpecEngine"


def check_device(device, name: str, *, op: str = _OP) -> torch.device:
    """``device`` (a torch.device or str) as a device this machine has, with its index; raises a
    ``ValueError`` that names ``name`` (and ``op``) otherwise. Only "cpu" and "cuda[:i]" are
    supported for a drafter on its own device."""
    if not isinstance(device, (torch.device, str)):
        raise ValueError(
            f"{op}: {name} must be a torch.device or a device string, got {type(device).__name__}"
        )
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"{op}: {name}: {device!r} is not a device ({error})") from error
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(
            f"{op}: {name} is on {device}; a drafter on its own device must be on 'cpu' or 'cuda:<i>'"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"{op}: {name} is on {device}, but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False)"
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < count:
        raise ValueError(
            f"{op}: {name} is on {device}, but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
        )
    return torch.device("cuda", index)


class DevicePair:
    """Where the target and the drafter live, and how tensors cross between them.

    Args:
        target_device, drafter_device: torch.device or str, "cpu" or "cuda[:i]" of this machine
            ("cuda" alone: the current CUDA device). ``drafter_device`` None: the target's.
        copy: testing: copy even on one device (clones into separate buffers).

    :meth:`bind` gives the pair of one request, with its streams and its own counters.
    """

    def __init__(self, target_device, drafter_device=None, *, copy: bool = False) -> None:
        if not isinstance(copy, bool):
            raise ValueError(f"DevicePair: copy must be a bool, got {copy!r}")
        self.target = _device(target_device, "target_device")
        self.drafter = self.target if drafter_device is None else _device(drafter_device, "drafter_device")
        if copy or self.target != self.drafter:  # two sides: devices this machine has, cpu or cuda
            self.target = check_device(self.target, "target_device", op="DevicePair")
            self.drafter = check_device(self.drafter, "drafter_device", op="DevicePair")
        self.copy = copy
        self.crosses = copy or self.target != self.drafter  # False: the identity
        self.target_stream: torch.cuda.Stream | None = None
        self.drafter_stream: torch.cuda.Stream | None = None
        self.transfers = self.tensors = self.moved_bytes = 0

    def __repr__(self) -> str:
        copy = ", copy=True" if self.copy else ""
        return f"DevicePair(target={self.target}, drafter={self.drafter}{copy})"

    def bind(self, drafter_stream=None, target_stream=None) -> DevicePair:
        """This pair for one request: the streams each side runs on (None: the device's current
        stream on CUDA; nothing on CPU), counters at zero."""
        bound = _copy_module.copy(self)
        bound.drafter_stream, bound.target_stream = drafter_stream, target_stream
        bound.transfers = bound.tensors = bound.moved_bytes = 0
        return bound

    def to_target(self, value):
        """``value`` (a tensor, None, or a NamedTuple / tuple / list / dict of them, nested; other
        leaves pass unchanged) made on the drafter's side, ready to read on the target's."""
        return self._move(value, self.drafter, self.target, self.drafter_stream, self.target_stream)

    def to_drafter(self, value):
        """``value`` made on the target's side, ready to read on the drafter's."""
        return self._move(value, self.target, self.drafter, self.target_stream, self.drafter_stream)

    def drafter_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A one-off copy of a target-side tensor for the drafter (e.g. the LM head's weight, at
        construction), synchronous and not counted; the same tensor when nothing crosses."""
        tensor = tensor.detach()
        if not self.crosses:
            return tensor
        return torch.empty(tensor.shape, dtype=tensor.dtype, device=self.drafter).copy_(tensor)

    # ------------------------------------------------------------------------------------------
    def _move(self, value, source, dest, source_stream, dest_stream):
        tensors: list[torch.Tensor] = []
        _leaves(value, tensors)
        if not self.crosses:
            if dest_stream is not None:
                if source_stream is not None:
                    dest_stream.wait_stream(source_stream)
                for tensor in tensors:
                    tensor.record_stream(dest_stream)
            return value
        if not tensors:
            return value
        moved = _copy(tensors, source, dest, source_stream, dest_stream)
        self.transfers += 1
        self.tensors += len(tensors)
        self.moved_bytes += sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        return _rebuild(value, iter(moved))


def _device(device, name: str) -> torch.device:
    """``device`` as a torch.device; "cuda" without an index: the current CUDA device."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"DevicePair: {name} must be a torch.device or a device string, got {device!r}"
        ) from error
    if device.type == "cuda" and device.index is None:
        return check_device(device, name, op="DevicePair")
    return device


def _copy(tensors, source: torch.device, dest: torch.device, source_stream, dest_stream) -> list:
    def empty(tensor, device, pinned=False):
        return torch.empty(tensor.shape, dtype=tensor.dtype, device=device, pin_memory=pinned)

    if source.type == "cuda" and dest.type == "cuda":
        sender = source_stream or torch.cuda.current_stream(source)
        receiver = dest_stream or torch.cuda.current_stream(dest)
        ready = torch.cuda.Event()
        ready.record(sender)
        receiver.wait_event(ready)
        # With both streams current, torch orders the peer copy after each and the result's
        # memory belongs to the receiving stream.
        with torch.cuda.stream(sender), torch.cuda.stream(receiver):
            return [empty(tensor, dest).copy_(tensor, non_blocking=True) for tensor in tensors]
    if source.type == "cuda":  # to the host, through pinned buffers
        sender = source_stream or torch.cuda.current_stream(source)
        with torch.cuda.stream(sender):
            moved = [empty(tensor, "cpu", pinned=True).copy_(tensor, non_blocking=True) for tensor in tensors]
            ready = torch.cuda.Event()
            ready.record(sender)
        ready.synchronize()  # the host waits for these copies only
        return moved
    if dest.type == "cuda":  # from the host: staged in pinned buffers, copied on the receiving stream
        receiver = dest_stream or torch.cuda.current_stream(dest)
        staged = [empty(tensor, "cpu", pinned=True).copy_(tensor) for tensor in tensors]
        with torch.cuda.stream(receiver):
            return [buffer.to(dest, non_blocking=True) for buffer in staged]
    return [empty(tensor, dest).copy_(tensor) for tensor in tensors]  # host to host: separate buffers


def _leaves(value, out: list) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _leaves(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _leaves(item, out)


def _rebuild(value, moved):
    if isinstance(value, torch.Tensor):
        return next(moved)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(_rebuild(item, moved) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuild(item, moved) for item in value)
    if isinstance(value, dict):
        return {key: _rebuild(item, moved) for key, item in value.items()}
    return value
