"""DISTREAL: kept-filter sub-networks, the design-space search, device-side selection, aggregation."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from flexray.data.datasets import to_tensor
from flexray.fleet.profiles import CATALOG
from flexray.methods.base import DeviceContext
from flexray.methods.distreal import Distreal, DistrealConfig, front_of, front_spec
from flexray.models import elastic, filters
from flexray.models.profile import profile_model, state_bytes
from flexray.models.zoo import cnn, lenet
from flexray.protocol import DeviceView, LocalData, Task, Update, Workload, compute_seconds, predict_times
from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job
from flexray.schedule import dse
from tests.conftest import job_tree


pytestmark = [pytest.mark.usefixtures("warm_ray_actors"), pytest.mark.usefixtures("one_torch_thread")]


@pytest.mark.parametrize("build,shape", [(lambda: cnn((3, 16, 16), 10, 8), (3, 16, 16)),
                                         (lambda: lenet((1, 28, 28), 10), (1, 28, 28))])
def test_kept_subnetwork_equals_masked_full_network(build, shape):
    torch.manual_seed(0)
    full = build()
    layers = filters.chain(full)
    width = filters.widths(layers, {la.name: 0.5 for la in layers})
    keep = filters.random_keep(layers, width, torch.Generator().manual_seed(3))
    ix = filters.index(full, keep)
    sub = filters.slim(full, width)
    sub.load_state_dict(elastic.extract(full.state_dict(), ix))
    x = torch.randn(5, *shape)
    y = torch.arange(5) % 10
    with filters.masked(full, keep):
        ref = full(x)
        torch.nn.functional.cross_entropy(ref, y).backward()
    out = sub(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    assert torch.allclose(out, ref, atol=1e-5)
    # same gradients on every kept entry: training the slim network is training the masked one
    full_grads = {k: p.grad for k, p in full.named_parameters()}
    for k, p in sub.named_parameters():
        assert torch.allclose(p.grad, filters.gather(full_grads[k], ix[k]), atol=1e-5), k
    # and it really is smaller: fewer FLOPs and bytes
    assert profile_model(sub, shape).train_flops_per_sample < 0.5 * profile_model(full, shape).train_flops_per_sample
    assert state_bytes(sub.state_dict()) < 0.6 * state_bytes(full.state_dict())


def test_dropout_step_updates_only_kept_filters_and_is_seeded():
    torch.manual_seed(0)
    full = cnn((1, 8, 8), 10, 8)
    layers = filters.chain(full)
    width = filters.widths(layers, {"conv1.0": 0.5, "conv2.0": 0.75})
    before = {k: v.clone() for k, v in full.state_dict().items()}
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    trainer = filters.DropoutSGD(full, width)
    trainer.step(x, y, torch.Generator().manual_seed(5), lr=0.1)
    keep = filters.random_keep(layers, width, torch.Generator().manual_seed(5))  # the step's draw
    changed = (full.state_dict()["conv2.0.weight"] != before["conv2.0.weight"]).any(dim=(1, 2, 3))
    assert changed.nonzero().flatten().tolist() == keep["conv2.0"].tolist()
    assert (full.state_dict()["conv1.0.bias"] != before["conv1.0.bias"]).sum() <= width["conv1.0"]

    torch.manual_seed(0)
    again = cnn((1, 8, 8), 10, 8)
    filters.DropoutSGD(again, width).step(x, y, torch.Generator().manual_seed(5), lr=0.1)
    for k, v in full.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def _proxy(n=240):
    from flexray.config import DataConfig
    from flexray.data import load_dataset

    ds = load_dataset(DataConfig())
    return ds, LocalData(to_tensor(ds.x_train[:n], ds.mean, ds.std), torch.as_tensor(ds.y_train[:n]))


def test_pareto_front_is_non_dominated_cached_and_reproducible(tmp_path):
    ds, data = _proxy()
    cfg = dse.DSEConfig(proxy_steps=6, proxy_samples=240, pop_size=6, generations=2, cache_dir=str(tmp_path))

    def model_fn():
        return cnn(ds.input_shape, 10, 8)

    front = dse.explore(model_fn, data, cfg, ds.input_shape)
    pts = front.points
    assert len(pts) >= 2 and len(front.evaluated) > len(pts) - 1
    for a in pts:  # nobody on the front is dominated by anything evaluated
        for b in front.evaluated:
            assert not (b.flops <= a.flops and b.loss <= a.loss and (b.flops < a.flops or b.loss < a.loss)), (a, b)
    for b in front.evaluated:  # and everything off it is dominated by (or ties) a front point
        assert any(a.flops <= b.flops and a.loss <= b.loss for a in pts)
    assert [p.flops for p in pts] == sorted(p.flops for p in pts)
    assert front.full_flops == max(p.flops for p in front.evaluated)

    cached = list(tmp_path.glob("*.json"))
    assert len(cached) == 1
    assert dse.explore(model_fn, data, cfg, ds.input_shape) == front  # read back, not searched again
    again = dse.explore(model_fn, data, cfg, ds.input_shape, use_cache=False)
    assert [(p.rates, p.flops, p.loss) for p in again.points] == [(p.rates, p.flops, p.loss) for p in pts]
    assert dse.Front.from_json(front.to_json()) == front


def test_search_shows_progress_and_names_a_reused_front(tmp_path, capsys):
    """A search with ``progress`` draws a bar over its candidates on stderr; a cached front is
    named in one line instead; without ``progress`` both are silent."""
    ds, data = _proxy()
    cfg = dse.DSEConfig(grid=[0.0, 0.5], proxy_steps=2, proxy_samples=40, pop_size=4, generations=2,
                        cache_dir=str(tmp_path))

    def model_fn():
        return cnn(ds.input_shape, 10, 8)

    dse.explore(model_fn, data, cfg, ds.input_shape, progress=True)
    err = capsys.readouterr().err
    assert "design-space search" in err and "candidate" in err
    dse.explore(model_fn, data, cfg, ds.input_shape, progress=True)
    err = capsys.readouterr().err.strip()
    assert err.startswith("design-space search: reusing the cached front") and str(tmp_path) in err
    assert len(err.splitlines()) == 1
    dse.explore(model_fn, data, cfg, ds.input_shape)
    assert capsys.readouterr().err == ""


def test_device_whose_budget_drops_picks_a_cheaper_point():
    method = Distreal(DistrealConfig(name="distreal"), lambda: cnn((1, 8, 8), 10, 8))
    points = [[0.75, 0.75, 1e4, 2.6], [0.5, 0.25, 5e4, 2.2], [0.0, 0.0, 1.3e5, 1.8]]  # rates, flops, loss
    spec = front_spec(["conv1.0", "conv2.0"], points)
    rpi3 = CATALOG["rpi3"]
    # each point is costed from the slim model it trains, on the device's per-layer clock
    secs = [compute_seconds(rpi3, method.point_work(front_of(spec), i, 100)) for i in range(3)]
    assert secs[0] < secs[1] < secs[2]
    dl, _, ul = predict_times(rpi3, 1.0, Workload(), method.model_bytes(), method.model_bytes())
    deadline = dl + ul + 1.01 * secs[2]  # the full model just fits at speed 1
    speeds = (1.0, secs[1] / secs[2], 0.5 * secs[0] / secs[2])
    fast, slow, crawl = (DeviceView(0, rpi3, s, 100, deadline_s=deadline) for s in speeds)
    picks = [method.choose(front_of(spec), v, 100) for v in (fast, slow, crawl)]
    assert picks == [2, 1, 0]  # full model, then cheaper, then the cheapest
    assert method.choose(front_of(spec), DeviceView(0, rpi3, 0.01, 100), 100) == 2  # no deadline: best convergence
    # the predicted cost follows the same choice the device makes
    task = Task(0, 0, spec)
    assert method.cost(task, slow, None).work == method.point_work(front_of(spec), 1, 100)  # type: ignore[arg-type]


def test_local_update_uses_its_pick_and_aggregation_ignores_dropped_entries():
    torch.manual_seed(0)
    method = Distreal(DistrealConfig(name="distreal", batch_size=8), lambda: cnn((1, 8, 8), 10, 8))
    state = method.init(cnn((1, 8, 8), 10, 8))
    spec = front_spec(["conv1.0", "conv2.0"], [[0.5, 0.75, 1e4, 2.0], [0.0, 0.0, 1e5, 1.0]])
    data = LocalData(torch.randn(8, 1, 8, 8), torch.arange(8) % 10)  # one mini-batch
    ctx = DeviceContext(lambda: cnn((1, 8, 8), 10, 8))
    ctx.seed(1)
    ctx.device = DeviceView(0, CATALOG["rpi3"], 0.1, 8, deadline_s=0.002)
    up = method.local_update(Task(0, 0, spec), state, data, ctx)
    assert up.metrics["point"] == 0 and up.metrics["drop.conv2.0"] == 0.75
    assert up.work == method.point_work(front_of(spec), 0, 8)  # the slim model's kernels, one epoch of one batch
    assert up.work.counted < method.point_work(front_of(spec), 1, 8).counted
    trained = (up.tensors["conv2.0.weight"] != state["conv2.0.weight"]).any(dim=(1, 2, 3))
    assert int(trained.sum()) == 4  # ceil(0.25 * 16) filters of conv2 in the single mini-batch

    other = {k: v + 1.0 for k, v in state.items()}  # a device that trained every entry
    merged = method.aggregate(0, state, [up, Update(other, weight=3.0, samples=3)])
    a, b = up.tensors["conv2.0.weight"], other["conv2.0.weight"]
    touched = a != state["conv2.0.weight"]  # entries the first device trained (kept filter x kept input)
    assert 0 < int(touched.sum()) < touched.numel()
    # untouched by the first device: the second's value alone (its weight is the whole denominator);
    # touched by both: weighted by the samples that trained the entry: 8 x 4/16 kept filters of
    # conv2 x 4/8 kept inputs from conv1 = 1 for the first device, 3 for the second
    assert filters.kept_fraction(method.full, {"conv1.0": 0.5, "conv2.0": 0.75})["conv2.0.weight"] == 0.125
    expect = torch.where(touched, (1 * a + 3 * b) / 4, b)
    assert torch.allclose(merged["conv2.0.weight"], expect, atol=1e-6)


def test_distreal_job_logs_front_and_choices_follow_the_traces(ray_cluster, mlflow_uri, tmp_path):
    # a width-32 cnn: on the rpi3's per-layer clock its dropout points span ~5x (width 8: under 2x,
    # per-step fixed costs dominate); at 0.2x speed the cheap points fit 1 s, the full one needs ~0.5x
    trace = {"kind": "random_walk", "sigma": 0.5, "step_s": 0.2, "min_speed": 0.2, "max_speed": 3.0}
    tree = job_tree(
        tracking__uri=mlflow_uri, rounds__num=5, rounds__deadline_s=1.0, rounds__stragglers="drop",
        data__samples_per_device=200, model={"name": "cnn", "width": 32}, method={
            "name": "distreal", "batch_size": 32, "lr": 0.1, "momentum": 0.5,
            "dse": {"proxy_samples": 300, "proxy_steps": 6, "pop_size": 6, "generations": 2,
                    "cache_dir": str(tmp_path / "cache")},
        },
        fleet={"actors": 2, "groups": [{"profile": "rpi3", "count": 3, "trace": trace},
                                       {"profile": "laptop_cpu", "count": 1}]},
    )
    res = run_job(parse_config(tree))
    client = MlflowClient(mlflow_uri)
    names = {f.path for f in client.list_artifacts(res.run_id, "method")}
    assert {"method/distreal_front.json", "method/distreal_front.png"} <= names
    local = client.download_artifacts(res.run_id, "method/distreal_front.json", str(tmp_path))
    with open(local) as f:
        front = json.load(f)
    assert len(front["points"]) >= 2
    events = pq.read_table(client.download_artifacts(res.run_id, "events.parquet", str(tmp_path))).to_pylist()
    rpi = [e for e in events if e["profile"] == "rpi3"]
    picks = {(e["device"], e["round"]): json.loads(e["metrics"]).get("point") for e in rpi if e["status"] == "ok"}
    assert len(set(picks.values())) >= 2  # time-varying speed changed the choice
    for e in rpi:  # each device's pick respected its own budget: nobody missed the deadline
        assert e["status"] == "ok", e
    by_speed = sorted((e["speed"], json.loads(e["metrics"])["point"]) for e in rpi)
    assert by_speed[0][1] <= by_speed[-1][1]  # slowest moment: no costlier point than the fastest
    accs = [h.accuracy for h in res.history]
    assert accs[-1] > max(0.2, accs[0])  # it learns (chance is 0.1)
