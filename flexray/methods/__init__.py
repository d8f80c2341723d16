"""Training methods, one per file; the driver finds them here by config name only."""

from __future__ import annotations

from flexray.errors import FlexrayError
from flexray.methods.base import Method
from flexray.methods.distreal import Distreal
from flexray.methods.fedasync import FedAsync
from flexray.methods.fedavg import FedAvg
from flexray.methods.fedbuff import FedBuff
from flexray.methods.fedclass import FedClass
from flexray.methods.fedprox import FedProx
from flexray.methods.fedrolex import FedRolex
from flexray.methods.fjord import FjORD
from flexray.methods.flextrain import FlexTrain
from flexray.methods.heterofl import HeteroFL
from flexray.methods.reft import Reft
from flexray.methods.splitfed import SplitFed
from flexray.methods.tiled import Tiled
from flexray.methods.uniform_dropout import UniformDropout

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (
        FedAvg, FedProx, FedAsync, FedBuff, HeteroFL, FjORD, FedRolex, FlexTrain, FedClass, Distreal, UniformDropout,
        Reft, SplitFed, Tiled,
    )
}


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise FlexrayError(f"config error: method.name: unknown method {name!r}; use one of {', '.join(METHODS)}") from None
