"""Training methods, one per file; the driver finds them here by config name only.

The registry maps names to ``module:Class`` paths and imports a method's module only when it is
asked for: a run pays for its own method's imports (SplitFed's SciPy, DISTREAL's pymoo), not
for every method's, on the driver and in every device actor.

A method of your own needs no edit here: name it by import path in the job
(``method.name: mypkg.mymethods:MyMethod``), or register it under the ``flexray.methods`` entry
point group of your package (``mymethod = "mypkg.mymethods:MyMethod"``) and use its name.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points

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
    "tiled": "flexray.tiled.method:Tiled",  # beside its own engine, a layer above the methods
}


def _paths() -> dict[str, str]:
    """Built-in methods, then those other installed packages register (built-ins win)."""
    found = {ep.name: ep.value for ep in entry_points(group="flexray.methods")}
    return {**found, **_PATHS}


def _load(path: str, field: str) -> type[Method]:
    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise FlexrayError(f"config error: {field}: cannot import {path!r} ({err}); check the module and class name") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise FlexrayError(f"config error: {field}: {path!r} is not a flexray Method subclass (flexray.methods.base.Method)")
    return cls


class _Registry(Mapping[str, "type[Method]"]):
    """name -> Method class, imported on first use."""

    def __getitem__(self, name: str) -> type[Method]:
        return _load(_paths()[name], "method.name")

    def __iter__(self) -> Iterator[str]:
        return iter(_paths())

    def __len__(self) -> int:
        return len(_paths())


METHODS: Mapping[str, type[Method]] = _Registry()


def method_class(name: str) -> type[Method]:
    """A registered name, or ``package.module:Class`` for a method outside flexray."""
    paths = _paths()
    if name in paths:
        return METHODS[name]
    if ":" in name:
        return _load(name, "method.name")
    raise FlexrayError(
        f"config error: method.name: unknown method {name!r}; use one of {', '.join(paths)} or package.module:Class"
    )
