"""Target/drafter integration and adapters (drafter hidden -> target LM-head input)."""

from crossspec_kernels.models.adapters import (
    Adapter,
    AdapterConfig,
    BottleneckAdapter,
    EagleAdapter,
    LinearAdapter,
    build_adapter,
    load_adapter,
    save_pretrained,
)

__all__ = [
    "Adapter",
    "AdapterConfig",
    "BottleneckAdapter",
    "EagleAdapter",
    "LinearAdapter",
    "build_adapter",
    "load_adapter",
    "save_pretrained",
]
