"""A stand-in accelerator for CPU-only machines: tensors on the ``meta`` device that hold real CPU
data, and refuse, as CUDA does, any op mixing them with CPU tensors.

Why: most machines running the suite have no GPU, yet a tensor created on the CPU next to a
model on CUDA (``torch.zeros(n)`` without ``device=``, a CPU mask, ``.numpy()`` of a device
tensor, a CPU generator drawing on the device) only fails there. Under ``FakeDeviceMode`` a
model moved to ``FAKE`` trains with the CPU's own kernels, so its results equal a CPU run's
bit for bit, while every op that would mix devices on a GPU raises ``DeviceMix``.

What CUDA accepts is accepted: 0-dim CPU tensors (scalars) anywhere, CPU index tensors in
advanced indexing (``t[idx]``, ``index_put_``), copies between devices. What it cannot tell:
which generator a random op without ``generator=`` draws from (CUDA has its own), and
numerical differences of CUDA kernels; the ``cuda`` tests cover those on a GPU.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

FAKE = torch.device("meta")
aten = torch.ops.aten
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_TRANSFERS = {aten._to_copy.default, aten.copy_.default}


class DeviceMix(RuntimeError):
    """An op that CUDA would refuse: CPU and device tensors mixed."""


class FakeTensor(torch.Tensor):
    """A tensor that says it lives on ``FAKE`` and keeps its data in ``elem`` (a CPU tensor)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> FakeTensor:
        r = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=FAKE, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self) -> str:  # type: ignore[override]
        return f"FakeTensor({self.elem!r})"

    def data_ptr(self) -> int:  # a wrapper has no storage of its own: its data's
        return self.elem.data_ptr()

    def untyped_storage(self) -> torch.UntypedStorage:
        return self.elem.untyped_storage()

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise DeviceMix(f"{func}: a fake-device tensor used outside FakeDeviceMode")


def _is_fake(device: Any) -> bool:
    return device is not None and torch.device(device).type == FAKE.type


class _BuildOnCpu(TorchFunctionMode):
    """``torch.tensor(data, device=FAKE)`` makes a dataless meta tensor without dispatching an op:
    build it on the CPU and move it, as it goes to a GPU."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor) and _is_fake(kwargs.get("device")):
            kwargs.pop("device")
            return func(*args, **kwargs).to(FAKE)
        return func(*args, **kwargs)


class FakeDeviceMode(TorchDispatchMode):
    """Run ops on ``FAKE`` tensors with CPU kernels; raise ``DeviceMix`` where CUDA would refuse."""

    def __enter__(self) -> FakeDeviceMode:
        # nn.Module.to swaps in new Parameters (of the subclass) instead of assigning .data
        self._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        self._build = _BuildOnCpu()
        self._build.__enter__()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()  # load_state_dict warns that copying into a meta parameter does nothing: here it does
        warnings.filterwarnings("ignore", message=r"for .*: copying from a non-meta parameter")
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._warnings.__exit__(*exc)
        self._build.__exit__(*exc)
        torch.__future__.set_overwrite_module_params_on_conversion(self._overwrite)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        to_fake = _is_fake(kwargs.get("device"))
        if to_fake:
            gen = kwargs.get("generator")
            if gen is not None and not _is_fake(gen.device):
                raise DeviceMix(f"{func}: a CPU generator draws a device tensor (draw on the CPU, then move it)")
            kwargs["device"] = torch.device("cpu")
        fake: list[torch.Tensor] = []
        cpu: list[torch.Tensor] = []

        def scan(t: Any) -> Any:
            if isinstance(t, FakeTensor):
                fake.append(t)
            elif isinstance(t, torch.Tensor) and t.dim() > 0:
                cpu.append(t)
            return t

        if func in _INDEXING:  # CPU indices are fine; self and values must be on the device
            scan(args[0])
            for v in args[2:3]:
                scan(v)
        elif func not in _TRANSFERS:
            tree_map(scan, (args, kwargs))
        if fake and cpu:
            raise DeviceMix(f"{func}: a CPU tensor of shape {tuple(cpu[0].shape)} mixed with device tensors")
        raw = tree_map(lambda t: t.elem if isinstance(t, FakeTensor) else t, (args, kwargs))
        out = func(*raw[0], **raw[1])
        if func is aten._local_scalar_dense.default:
            return out
        if func is aten._to_copy.default:
            return FakeTensor(out) if to_fake else out
        if func._schema.is_mutable and args and isinstance(out, torch.Tensor) and out is raw[0][0]:
            return args[0]  # in place: the tensor the caller holds
        wrap = to_fake or bool(fake)
        return tree_map(lambda t: FakeTensor(t) if wrap and type(t) is torch.Tensor else t, out)
