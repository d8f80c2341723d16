"""Every method, tile actor and split server computes on an accelerator exactly as on the CPU.

Device actors, the split server, the tile actors and the driver's server-side work (evaluation,
DISTREAL's search, REFT's distillation) compute where ``fleet.compute_device`` puts them, and
every tensor that crosses the object store comes back on the CPU. On a CPU-only machine the
accelerator is ``tests/fake_device.py``'s stand-in (CPU kernels, CUDA's device rules), so the
rounds must equal the CPU ones exactly; the ``cuda`` tests run the same rounds on a real GPU
(``benchmarks/gpu_check.sh``) and compare at 1e-4.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from flexray.data import load_dataset
from flexray.fleet.fleet import assign_actors, build_fleet
from flexray.fleet.report import DeviceReport, RoundRequest
from flexray.methods import split_server
from flexray.methods.split_server import ServerClient, SplitServer
from flexray.protocol import DeviceView, State, Update
from flexray.runtime import actor, job as job_module
from flexray.tiled import actor as tiled
from flexray.runtime.assembly import load_config
from flexray.runtime.job import Job
from flexray.tiled.actor import TiledStep, TileHost, fused_stack
from flexray.schedule.tiling import choose_plan
from flexray.fleet.profiles import CATALOG
from tests.conftest import REPO
from tests.fake_device import FAKE, DeviceMix, FakeDeviceMode
from tests.test_tiling import OPT, bn_model

# One round of each method on the quickstart's first 4 devices; the overrides keep it to seconds.
METHODS = {
    "fedavg": [], "fedasync": [], "fedbuff": [], "heterofl": [], "fjord": [], "fedrolex": [],
    "flextrain": ["model.name=resnet8"], "fedclass": ["model.name=resnet8"],
    "distreal": ["method.dse.pop_size=4", "method.dse.generations=1", "method.dse.proxy_samples=40",
                 "method.dse.proxy_steps=3"],
    "uniform_dropout": [], "reft": ["method.distill_steps=5", "method.proxy_samples=64"], "splitfed": [],
    "fedprox": ["method.mu=0.1"],
}
CPU = ["fleet.compute_device=cpu"]


@dataclass
class Round:
    reports: list[DeviceReport]
    updates: list[Update]  # the devices' (and the split server's) updates, as they reach the driver
    state: State  # the driver's aggregate
    metrics: dict[str, float]  # the driver's evaluation
    compute: torch.device  # where the device actor computed


def one_round(method_name: str, overrides: list[str], workdir: Path) -> Round:
    """One sync round through the runtime's own code, in-process: the driver's preparation, one
    ``DeviceHost`` for 4 devices, the split server if the method has one, aggregation, evaluation."""
    cfg = load_config(REPO / "jobs" / "quickstart.yaml", [
        f"method.name={method_name}", "model.width=8", "fleet.actors=1", "fleet.num_gpus_per_actor=1",
        "fleet.batch_clients=1", f"method.dse.cache_dir={workdir}" if method_name == "distreal" else "seed=0",
        *METHODS[method_name], *overrides])
    ds = load_dataset(cfg.data)
    devices = build_fleet(cfg, ds.y_train)[:4]
    job = Job(cfg, ds, devices)
    torch.manual_seed(0)
    method = job.method()
    state = method.init(job.model())  # the global weights live on the CPU
    job.prepare(method, workdir)
    tasks = method.plan(0, [DeviceView(d.id, d.profile, 1.0, len(d.indices)) for d in devices], state)
    host = actor.DeviceHost(cfg, assign_actors(cfg, devices)[0], devices, ds)
    server = None
    if isinstance(service := method.round_service(), SplitServer):
        server = split_server.SplitServerHost(cfg, service.spec, ds.input_shape, ds.num_classes, job.server_profile)
        server.begin_round(0, state, tasks)
    client = ServerClient(server) if server is not None else None
    reports, updates = host.run_round(RoundRequest(0, 0.0, None, False, tuple(tasks), False, 0, client), state)
    if server is not None:
        updates = [*updates, *server.end_round([t.device for t in tasks])]
    new = method.aggregate(0, state, updates)
    metrics = method.evaluate(new, job.model().to(job_module.driver_device(cfg.fleet)), job.test_data())
    return Round(reports, updates, new, metrics, host.compute)


@contextlib.contextmanager
def fake_accelerator(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Actors, the split server, tile hosts and the driver compute on the stand-in accelerator."""
    with monkeypatch.context() as m:
        for module in (actor, split_server, tiled):
            m.setattr(module, "compute_device", lambda setting, share: FAKE)
        m.setattr(job_module, "driver_device", lambda fleet: FAKE)
        with FakeDeviceMode():
            yield


def assert_same(got: Round, want: Round, tol: float, metric_tol: float) -> None:
    assert want.compute.type == "cpu" and got.compute.type != "cpu"
    assert [r.status for r in got.reports] == [r.status for r in want.reports] == ["ok"] * 4
    assert [r.samples for r in got.reports] == [r.samples for r in want.reports]
    for a, b in zip(got.updates, want.updates, strict=True):
        assert list(a.tensors) == list(b.tensors)
        assert all(v.device.type == "cpu" for v in a.tensors.values()), "updates cross the object store on the CPU"
        assert max(float((a.tensors[k].double() - b.tensors[k].double()).abs().max()) for k in a.tensors) <= tol
    assert all(v.device.type == "cpu" for v in got.state.values())
    assert max(float((got.state[k].double() - want.state[k].double()).abs().max()) for k in want.state) <= tol
    assert got.metrics.keys() == want.metrics.keys()
    assert all(abs(got.metrics[k] - want.metrics[k]) <= metric_tol for k in want.metrics), (got.metrics, want.metrics)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_round_on_a_device_equals_the_cpu_round(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Devices, split server and driver on the stand-in accelerator: nothing mixes devices, every
    update and the aggregate come back on the CPU, and the round equals the CPU's exactly."""
    want = one_round(name, CPU, tmp_path / "cpu")
    with fake_accelerator(monkeypatch):
        got = one_round(name, [], tmp_path / "device")
    assert_same(got, want, 0.0, 1e-9)


@pytest.mark.parametrize("name", ["fedprox", "heterofl", "fjord", "flextrain"])
def test_a_stacked_round_on_a_device_equals_the_cpu_one(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched-clients path (``fleet.batch_clients``) on the stand-in: label masks, FjORD's
    drawn widths and BatchNorm's per-device statistics stay on the device, updates come back on the CPU."""
    stacked = ["fleet.batch_clients=4"]
    want = one_round(name, [*CPU, *stacked], tmp_path / "cpu")
    with fake_accelerator(monkeypatch):
        got = one_round(name, stacked, tmp_path / "device")
    assert_same(got, want, 0.0, 1e-9)


def tiled_steps(compute: str, steps: int = 2) -> tuple[list[State], list[object], torch.device]:
    """``steps`` tiled steps of a BatchNorm + dropout + in-place model on a 2x2 grid of in-process
    tile hosts computing on ``compute``: every host's weights, the last step's output tiles, and
    where the hosts computed."""
    rng = random.Random(3)
    torch.manual_seed(3)
    model = bn_model(rng)
    plan = choose_plan(fused_stack(model, (2, 19, 19), 3), [(CATALOG["rpi3"], 1.0)] * 4, 4, grid=(2, 2))
    hosts = [TileHost(r, copy.deepcopy(model), 3, plan, OPT, compute=compute, num_gpus=1.0) for r in range(4)]
    runner = TiledStep(plan, hosts, seed=5)
    g = torch.Generator().manual_seed(0)
    outs: list[object] = []
    for _ in range(steps):
        x, y = torch.randn(4, 2, 19, 19, dtype=torch.float64, generator=g), torch.randint(0, 3, (4,), generator=g)
        outs, grads = runner.backprop(x, y)
        runner.apply(grads)
    return [h.state() for h in hosts], outs, hosts[0].dev


def test_tile_hosts_on_a_device_equal_the_cpu_ones(monkeypatch: pytest.MonkeyPatch, one_torch_thread: None) -> None:
    """Tiles, halos, BN statistics and gradients travel as CPU arrays between tile hosts on the
    stand-in accelerator; the weights they end with equal the CPU hosts' exactly."""
    want_states, want_outs, _ = tiled_steps("cpu")
    with fake_accelerator(monkeypatch):
        got_states, got_outs, dev = tiled_steps("cuda")
    assert dev == FAKE
    for a, b in zip(got_states, want_states, strict=True):
        assert all(v.device.type == "cpu" for v in a.values())
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert all((o == w).all() for o, w in zip(got_outs, want_outs, strict=True))  # type: ignore[union-attr]


def test_the_stand_in_refuses_what_cuda_refuses() -> None:
    """The stand-in is only worth its tests if it fails where a GPU fails."""
    with FakeDeviceMode():
        x = torch.ones(4, 3, device=FAKE)
        with pytest.raises(DeviceMix):
            x * torch.ones(4, 3)  # a CPU tensor beside a device one
        with pytest.raises(DeviceMix):
            x.index_select(0, torch.tensor([0, 1]))  # CUDA wants the index on the device
        with pytest.raises(DeviceMix):
            torch.randperm(4, generator=torch.Generator(), device=FAKE)  # a CPU generator cannot draw there
        with pytest.raises(RuntimeError):
            x.numpy()
        assert x[torch.tensor([0, 2])].shape == (2, 3)  # CPU indices into a device tensor are fine on CUDA
        assert float((x * torch.tensor(2.0)).sum()) == 24.0  # so are 0-dim CPU tensors (scalars)
        assert torch.tensor([1, 2], device=x.device).device == FAKE


# ---------------------------------------------------------------- on a real GPU (benchmarks/gpu_check.sh)

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (gpu_check.sh)")]


@pytest.fixture
def full_fp32() -> Iterator[None]:
    """TF32 convolutions would differ from the CPU by ~1e-3; the comparison is of float32 on both."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.usefixtures("full_fp32")
@needs_cuda[0]
@needs_cuda[1]
def test_cuda_round_equals_the_cpu_round(name: str, tmp_path: Path) -> None:
    """The device actor, the split server and the driver's preparation, aggregation and
    evaluation on CUDA: the round equals the CPU's to float rounding."""
    want = one_round(name, CPU, tmp_path / "cpu")
    got = one_round(name, ["fleet.compute_device=cuda"], tmp_path / "cuda")
    assert_same(got, want, 1e-4, 1e-2)  # a test prediction near a tie may flip: one sample of ~360


@pytest.mark.usefixtures("full_fp32")
@needs_cuda[0]
@needs_cuda[1]
def test_cuda_tile_hosts_equal_the_cpu_ones() -> None:
    want_states, _, _ = tiled_steps("cpu")
    got_states, _, dev = tiled_steps("cuda")
    assert dev.type == "cuda"
    for a, b in zip(got_states, want_states, strict=True):
        assert all(v.device.type == "cpu" for v in a.values())
        assert max(float((a[k].double() - b[k].double()).abs().max()) for k in b) <= 1e-4
