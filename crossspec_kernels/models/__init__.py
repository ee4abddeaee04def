"""Target/drafter integration and adapters (drafter hidden -> target LM-head input)."""

from crossspec_kernels.models.adapters import (
    Adapter,
    AdapterConfig,
    AttentionAdapter,
    BottleneckAdapter,
    EagleAdapter,
    LinearAdapter,
    StackedBottleneckAdapter,
    build_adapter,
    load_adapter,
    research_adapter_config,
    save_pretrained,
)

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AttentionAdapter",
    "BottleneckAdapter",
    "EagleAdapter",
    "LinearAdapter",
    "StackedBottleneckAdapter",
    "build_adapter",
    "load_adapter",
    "research_adapter_config",
    "save_pretrained",
]
