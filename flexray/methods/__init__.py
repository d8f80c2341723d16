"""Training methods, one per file; the driver finds them here by config name only.

The registry maps names to ``module:Class`` paths and imports a method's module only when it is
asked for: a run pays for its own method's imports (SplitFed's SciPy, DISTREAL's pymoo), not
for every method's, on the driver and in every device actor.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from flexray.errors import FlexrayError
from flexray.methods.base import Method

_PATHS: dict[str, str] = {
    "fedavg": "flexray.methods.fedavg:FedAvg",
    "fedprox": "flexray.methods.fedprox:FedProx",
    "fedasync": "flexray.methods.fedasync:FedAsync",
    "fedbuff": "flexray.methods.fedbuff:FedBuff",
    "heterofl": "flexray.methods.heterofl:HeteroFL",
    "fjord": "flexray.methods.fjord:FjORD",
    "fedrolex": "flexray.methods.fedrolex:FedRolex",
    "flextrain": "flexray.methods.flextrain:FlexTrain",
    "fedclass": "flexray.methods.fedclass:FedClass",
    "distreal": "flexray.methods.distreal:Distreal",
    "uniform_dropout": "flexray.methods.uniform_dropout:UniformDropout",
    "reft": "flexray.methods.reft:Reft",
    "splitfed": "flexray.methods.splitfed:SplitFed",
    "tiled": "flexray.methods.tiled:Tiled",
}


class _Registry(Mapping[str, "type[Method]"]):
    """name -> Method class, imported on first use."""

    def __getitem__(self, name: str) -> type[Method]:
        module, _, attr = _PATHS[name].partition(":")
        cls: type[Method] = getattr(importlib.import_module(module), attr)
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(_PATHS)

    def __len__(self) -> int:
        return len(_PATHS)


METHODS: Mapping[str, type[Method]] = _Registry()


def method_class(name: str) -> type[Method]:
    if name not in _PATHS:
        raise FlexrayError(f"config error: method.name: unknown method {name!r}; use one of {', '.join(_PATHS)}")
    return METHODS[name]
