"""Coupled channel groups of any CNN: the one structure width slices, filter dropout and pruning share.

A *group* is a set of channels that must be kept or dropped together: a conv's filters, the
BatchNorm after it and the next layer's input channels; across a residual add, every tensor of
the stream; through a depthwise conv, its input and output. torch-pruning's ``DependencyGraph``
derives the groups by tracing the model once (any torchvision CNN, residual or depthwise), so
no architecture needs hand-written graph code here.

A *keep* picks, per group, which of its ``C`` channels stay. From the groups we record, for
every state entry, which dimension each group indexes and which group channel every position of
that dimension belongs to (``Slot``): a Linear after a Flatten has ``H x W`` positions per
channel. That gives ``index(keep)``, where each entry of the kept sub-network lives in the full
state (the layout ``flexray.models.elastic`` gathers and aggregates with), in microseconds, so
DISTREAL can draw a fresh keep per mini-batch. ``slim(keep)`` builds the physically smaller
network with torch-pruning's own per-layer pruners.

A group's channels are ordered positions, so one implementation serves HeteroFL/FjORD (leading
``ceil(p*C)``), FedRolex (a rolling window), DISTREAL/uniform dropout (random) and REFT (L1).
On construction the sub-network is checked against the masked full network (dropped channels
zeroed at every layer of their group) on one input; a model whose graph the analysis gets wrong
is refused in one line rather than trained wrongly.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import nn

from flexray.errors import FlexrayError
from flexray.models import elastic
from flexray.models.resnet_cifar import ShortcutA

Keep = dict[str, torch.Tensor]
"""Per group name: sorted positions of the channels kept (a group absent keeps all)."""

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_HINT = "use cnn, vgg, resnet20 or torchvision:resnet18"


@dataclass(frozen=True)
class Slot:
    """One dimension of one state entry that a group indexes: ``roots[i]`` is the group channel
    position ``positions[i]`` of that dimension belongs to."""

    key: str
    dim: int
    positions: torch.Tensor
    roots: torch.Tensor


@dataclass(frozen=True)
class Member:
    """A module the group prunes, with torch-pruning's handler for it (for ``slim``)."""

    module: str
    handler: Callable[[nn.Module, Sequence[int]], Any]
    positions: torch.Tensor
    roots: torch.Tensor
    out: bool  # the module's outputs are the group's channels (masked in ``masked``)


@dataclass(frozen=True)
class Group:
    name: str  # the root layer's module name
    channels: int
    slots: tuple[Slot, ...]
    members: tuple[Member, ...]


class ShortcutPruner(tp.pruner.function.BasePruningFunc):
    """ResNet option-A shortcuts zero-pad channels: to torch-pruning an opaque layer whose input
    and output channels belong to different groups; pruning keeps its channel map (``source``)."""

    TARGET_MODULES = ShortcutA

    def prune_out_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
        drop = set(int(i) for i in idxs)
        layer.source = [s for i, s in enumerate(layer.channel_map()) if i not in drop]
        return layer

    def prune_in_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
        drop = set(int(i) for i in idxs)
        alive = [i for i in range(layer.cin) if i not in drop]
        new = {old: j for j, old in enumerate(alive)}
        layer.source = [new.get(s, -1) if s >= 0 else -1 for s in layer.channel_map()]
        layer.cin = len(alive)
        return layer

    def get_out_channels(self, layer: ShortcutA) -> int:
        return len(layer.channel_map())

    def get_in_channels(self, layer: ShortcutA) -> int:
        return layer.cin


def _probe(module: nn.Module, handler: Callable[[nn.Module, Sequence[int]], Any]) -> list[tuple[str, int]]:
    """Which (state key, dim) a handler shrinks: remove one position from a copy and compare."""
    trial = copy.deepcopy(module)
    before = {k: v.shape for k, v in trial.state_dict().items()}
    handler(trial, [0])
    after = {k: v.shape for k, v in trial.state_dict().items()}
    return [(k, d) for k, s in before.items() for d in range(len(s)) if after[k][d] == s[d] - 1]


def _classifier(model: nn.Module) -> nn.Module | None:
    """The last conv/linear layer: its outputs are the labels (a 1x1 conv in Darknet), never pruned."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return layers[-1] if layers else None


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise FlexrayError("channel groups need the model's input shape; build it with flexray.models.build_model")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


class ChannelGroups:
    """The coupled channel groups of one model (see the module doc)."""

    def __init__(self, model: nn.Module) -> None:
        for name, m in model.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                raise FlexrayError(f"config error: model.name: channel groups do not cover attention layers "
                                   f"({name}); {_HINT}")
            if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels:  # depthwise (groups == C) is covered
                raise FlexrayError(f"config error: model.name: channel groups do not cover grouped convolutions "
                                   f"({name}, groups={m.groups}; depthwise ones are covered); {_HINT}")
        names = {m: n for n, m in model.named_modules()}
        example = torch.zeros(2, *_input_shape(model))
        head = _classifier(model)
        try:
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, customized_pruners={ShortcutA: ShortcutPruner()}, verbose=False)
            raw = list(graph.get_all_groups(ignored_layers=[head] if head is not None else [],
                                            root_module_types=[nn.Conv2d, nn.Linear]))
        except Exception as err:  # noqa: BLE001 - tracing failures come in any type
            raise FlexrayError(f"config error: model.name: channel groups could not be traced "
                               f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); {_HINT}") from None
        probes: dict[tuple[type, Any], list[tuple[str, int]]] = {}
        groups: list[Group] = []
        for g in raw:
            root = g[0].dep.target.module
            slots, members = [], []
            for item in g.items:
                module = item.dep.target.module
                if not isinstance(module, nn.Module) or module not in names or isinstance(module, tp.ops.DummyMHA):
                    continue  # torch-pruning's graph ops (add, flatten, ...) hold no state
                handler = item.dep.handler
                key = (type(module), getattr(handler, "__func__", handler), _shape_key(module))
                if key not in probes:
                    probes[key] = _probe(module, handler)
                pos = torch.tensor(item.idxs, dtype=torch.long)
                roots = torch.tensor(item.root_idxs, dtype=torch.long)
                mname = names[module]
                members.append(Member(mname, handler, pos, roots, graph.is_out_channel_pruning_fn(handler)))
                for k, d in probes[key]:
                    slots.append(Slot(f"{mname}.{k}" if mname else k, d, pos, roots))
            groups.append(Group(names[root], len(g[0].idxs), tuple(slots), tuple(members)))
        if not groups:
            raise FlexrayError(f"config error: model.name: the model has no prunable channels; {_HINT}")
        self.groups = tuple(groups)
        self.by_name = {g.name: g for g in self.groups}
        self.shapes = {k: v.shape for k, v in model.state_dict().items()}
        self._slots: dict[str, list[tuple[Group, Slot]]] = {}
        for g in self.groups:
            for s in g.slots:
                self._slots.setdefault(s.key, []).append((g, s))
        self._check(model)

    # ------------------------------------------------------------ keeps

    def leading(self, width: Mapping[str, int], offset: int | None = None) -> Keep:
        """The first ``width`` channels of each group, or a window from ``offset`` wrapping around."""
        out: Keep = {}
        for g in self.groups:
            k = int(width.get(g.name, g.channels))
            if k < g.channels:
                chans = torch.arange(k) if offset is None else (int(offset) + torch.arange(k)) % g.channels
                out[g.name] = chans.sort().values
        return out

    def random(self, width: Mapping[str, int], generator: torch.Generator) -> Keep:
        """DISTREAL: a uniformly random set of ``width`` channels per group."""
        return {g.name: torch.randperm(g.channels, generator=generator)[: width[g.name]].sort().values
                for g in self.groups if width.get(g.name, g.channels) < g.channels}

    def l1(self, state: Mapping[str, torch.Tensor], width: Mapping[str, int]) -> Keep:
        """REFT: per group, the channels whose filters have the largest L1 norm (Li et al. 2017),
        summed over every conv/linear that produces the group's channels."""
        out: Keep = {}
        for g in self.groups:
            k = int(width.get(g.name, g.channels))
            if k >= g.channels:
                continue
            norm = torch.zeros(g.channels, dtype=torch.float64)
            for s in g.slots:
                t = state[s.key]
                if s.dim != 0 or not s.key.endswith("weight") or t.dim() < 2:
                    continue  # a filter's own weights only (not BN scales, not input columns)
                per = t.detach().abs().to("cpu", torch.float64).reshape(t.shape[0], -1).sum(1)  # keeps live on the CPU
                norm.index_add_(0, s.roots, per[s.positions])
            out[g.name] = norm.topk(k).indices.sort().values
        return out

    # ------------------------------------------------------------ layout

    def _alive(self, keep: Keep) -> dict[str, torch.Tensor]:
        out = {}
        for name, kept in keep.items():
            mask = torch.zeros(self.by_name[name].channels, dtype=torch.bool)
            mask[kept] = True
            out[name] = mask
        return out

    def index(self, keep: Keep) -> elastic.Index:
        """Where every entry of the kept sub-network lives in the full state (None: whole dim)."""
        alive = self._alive(keep)
        out: elastic.Index = {}
        for key, shape in self.shapes.items():
            dims: list[torch.Tensor | None] = [None] * len(shape)
            for g, s in self._slots.get(key, ()):
                if g.name not in alive:
                    continue
                drop = s.positions[~alive[g.name][s.roots]]
                if len(drop):
                    live = torch.ones(shape[s.dim], dtype=torch.bool) if dims[s.dim] is None else _mask(dims[s.dim], shape[s.dim])
                    live[drop] = False
                    dims[s.dim] = live.nonzero().flatten()
            out[key] = tuple(dims)
        return out

    def kept_fraction(self, width: Mapping[str, int]) -> dict[str, float]:
        """Per state entry: the fraction of random keeps of ``width`` that contain it (kept
        channel x kept input channel, as ``index`` lays entries out)."""
        frac = {g.name: int(width.get(g.name, g.channels)) / g.channels for g in self.groups}
        out: dict[str, float] = {}
        for key in self.shapes:
            f = 1.0
            for g, _ in self._slots.get(key, ()):
                f *= frac[g.name]
            out[key] = f
        return out

    def dead_inputs(self, alive: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per weight key: the input columns fed by channels not ``alive`` (bool per group)."""
        out: dict[str, torch.Tensor] = {}
        for g in self.groups:
            live = alive.get(g.name)
            if live is None or bool(live.all()):
                continue
            for s in g.slots:
                if s.dim == 1 and s.key.endswith("weight"):
                    cols = s.positions[~live[s.roots]]
                    if len(cols):
                        prev = out.get(s.key)
                        out[s.key] = cols if prev is None else torch.cat([prev, cols]).unique()
        return out

    # ------------------------------------------------------------ networks

    def slim(self, model: nn.Module, keep: Keep) -> nn.Module:
        """A physically smaller copy of ``model`` holding only the kept channels (same weights), in
        training mode."""
        out = copy.deepcopy(model)
        alive = self._alive(keep)
        for g in self.groups:
            if g.name not in alive:
                continue
            for m in g.members:
                drop = m.positions[~alive[g.name][m.roots]]
                if len(drop):
                    m.handler(out.get_submodule(m.module), drop.tolist())
        return out.train()  # like a freshly built model, whatever mode ``model`` was left in

    def rewire(self, model: nn.Module, sub: nn.Module, keep: Keep) -> None:
        """Point ``sub``'s parameter-free channel maps (option-A shortcuts) at ``keep``'s channels,
        so a slim network built once runs every keep of the same widths."""
        fresh: dict[str, ShortcutA] = {}
        alive = self._alive(keep)
        for g in self.groups:
            for m in g.members:
                if not isinstance(getattr(m.handler, "__self__", None), ShortcutPruner):
                    continue
                if m.module not in fresh:
                    fresh[m.module] = copy.deepcopy(model.get_submodule(m.module))
                drop = m.positions[~alive[g.name][m.roots]] if g.name in alive else m.positions[:0]
                if len(drop):
                    m.handler(fresh[m.module], drop.tolist())
        for name, src in fresh.items():
            dst = sub.get_submodule(name)
            dst.source, dst.cin = src.source, src.cin

    @contextmanager
    def masked(self, model: nn.Module, keep: Keep) -> Iterator[nn.Module]:
        """``model`` with dropped channels zeroed at every layer that outputs them: what the kept
        sub-network must equal."""
        alive = self._alive(keep)
        handles = []
        for g in self.groups:
            if g.name not in alive:
                continue
            for m in g.members:
                if not m.out:
                    continue
                drop = m.positions[~alive[g.name][m.roots]]

                def hook(_m: nn.Module, _i: tuple, y: torch.Tensor, drop: torch.Tensor = drop) -> torch.Tensor:
                    mask = torch.ones(y.shape[1], dtype=y.dtype, device=y.device)
                    mask[drop] = 0.0
                    return y * mask.view(1, -1, *([1] * (y.dim() - 2)))

                handles.append(model.get_submodule(m.module).register_forward_hook(hook))
        try:
            yield model
        finally:
            for h in handles:
                h.remove()

    def add_scalers(self, sub: nn.Module, width: Mapping[str, int]) -> nn.Module:
        """Inverted dropout: scale a module's outputs by ``C / kept`` of its group while training."""
        for g in self.groups:
            k = int(width.get(g.name, g.channels))
            if k >= g.channels:
                continue
            for m in g.members:
                mod = sub.get_submodule(m.module)
                if m.out and isinstance(mod, (nn.Conv2d, nn.Linear)) and not _depthwise(mod):
                    mod.register_forward_hook(elastic.Scaler(k / g.channels))
        return sub

    def _check(self, model: nn.Module) -> None:
        """Sub-network == masked full network on one batch, for a random keep of half of each group
        (a guard against a wrongly traced graph, which differs by the activations' own size)."""
        gen = torch.Generator().manual_seed(0)
        keep = self.random({g.name: max(1, g.channels // 2) for g in self.groups}, gen)
        x = torch.randn(8, *_input_shape(model), generator=gen)
        try:
            sub = self.slim(model, keep)
            sub.load_state_dict(elastic.extract(model.state_dict(), self.index(keep)))
            with torch.no_grad(), elastic.batch_statistics(model, sub):
                with self.masked(model, keep):
                    want = model(x)
                got = sub(x)
        except Exception as err:  # noqa: BLE001
            raise FlexrayError(f"config error: model.name: kept-channel sub-networks of this model do not run "
                               f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); {_HINT}") from None
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-6):
            diff = float((got - want).abs().max()) if got.shape == want.shape else float("nan")
            raise FlexrayError(f"config error: model.name: kept-channel sub-networks of this model differ from its "
                               f"masked full network (by {diff:.3g}); {_HINT}")


def _mask(ix: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[ix] = True
    return m


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1


def _shape_key(m: nn.Module) -> tuple:
    """Modules of one type can differ in which dims a handler touches (a square conv, a depthwise
    one): probe per parameter shape and group count."""
    return (getattr(m, "groups", 1), tuple(tuple(v.shape) for v in m.state_dict().values()))


_CACHE: weakref.WeakKeyDictionary[nn.Module, ChannelGroups] = weakref.WeakKeyDictionary()


def channel_groups(model: nn.Module) -> ChannelGroups:
    """The model's channel groups, analysed once per model object."""
    found = _CACHE.get(model)
    if found is None:
        found = _CACHE[model] = ChannelGroups(_on_cpu(model))
    return found


def _on_cpu(model: nn.Module) -> nn.Module:
    """The model, or a CPU copy of one on a GPU: the analysis is structural (names, positions,
    shapes; its keeps and indices are CPU tensors), and tracing it on the CPU keeps its example
    inputs and seeded check where they were drawn."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).cpu()


__all__ = ["ChannelGroups", "Group", "Keep", "Member", "ShortcutPruner", "Slot", "channel_groups"]
