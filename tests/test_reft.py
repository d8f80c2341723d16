"""REFT: capability-driven L1 filter pruning and server-side ensemble distillation; uniform dropout."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from flexray.config import DataConfig
from flexray.data import load_dataset
from flexray.data.datasets import to_tensor
from flexray.errors import FlexrayError
from flexray.fleet.profiles import CATALOG
from flexray.methods.base import DeviceContext, ServerData
from flexray.methods.reft import Reft, ReftConfig
from flexray.methods.distreal import front_of, front_spec
from flexray.methods.uniform_dropout import UniformDropout, UniformDropoutConfig
from flexray.models import elastic, filters
from flexray.models.profile import state_bytes
from flexray.models.zoo import cnn
from flexray.protocol import DeviceView, LocalData, SubModel, Task, Workload, compute_seconds, predict_times
from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job
from flexray.methods.reft import Pruned, ratio_of
from tests.conftest import job_tree


pytestmark = [pytest.mark.usefixtures("warm_ray_actors"), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig())


def _method(ds, **kw):
    torch.manual_seed(0)
    m = Reft(ReftConfig(name="reft", **{"proxy_samples": 300, **kw}), lambda: cnn(ds.input_shape, 10, 8))
    m.setup(ServerData(ds, np.arange(1000, 1437)), None)  # type: ignore[arg-type]
    return m, m.init(cnn(ds.input_shape, 10, 8))


def _shard(ds, i, n=100):
    sl = slice(i * n, (i + 1) * n)
    return LocalData(to_tensor(ds.x_train[sl], ds.mean, ds.std), torch.as_tensor(np.array(ds.y_train[sl])))


def test_l1_pruning_keeps_the_largest_filters_and_is_really_smaller(digits):
    m, state = _method(digits)
    keep = filters.l1_keep(m.full, state, m.width(0.5))
    norms = state["conv2.0.weight"].abs().sum(dim=(1, 2, 3))
    assert set(keep["conv2.0"].tolist()) == set(norms.topk(8).indices.tolist())
    full = m.profile(0.0, digits.input_shape)
    pruned = m.profile(0.5, digits.input_shape)
    assert pruned.train_flops_per_sample < 0.5 * full.train_flops_per_sample
    assert pruned.param_bytes < 0.6 * full.param_bytes
    model = m.pruned(0.5)  # the pruned network is the masked full one on the kept filters
    model.load_state_dict(elastic.extract(state, m.keep_index(state, 0.5)))
    x = _shard(digits, 0, 8).x
    ref = cnn(digits.input_shape, 10, 8)
    ref.load_state_dict(state)
    with filters.masked(ref, keep):
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_pruning_ratio_follows_capability_and_fits_the_deadline(digits):
    m, state = _method(digits)
    rpi3 = CATALOG["rpi3"]

    def total(ratio: float, speed: float) -> float:  # the pruned model's own kernels, on the rpi3's clock
        prof = m.profile(ratio, digits.input_shape)
        work = prof.step.epochs(100, m.cfg.batch_size, m.cfg.local_epochs)
        return sum(predict_times(rpi3, speed, work, prof.param_bytes, prof.param_bytes))

    deadline = 1.01 * total(0.0, 3.0)  # the full model just fits at 3x speed
    views = [DeviceView(i, rpi3, s, 100, deadline_s=deadline) for i, s in enumerate([3.0, 2.6, 2.2, 0.01])]
    ratios = [ratio_of(t.spec) for t in m.plan(0, views, state)]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]  # slower device, more pruning
    assert ratios[-1] == max(m.rcfg.ratios)  # nothing fits: the smallest model
    for v, r in zip(views[:-1], ratios[:-1]):
        assert total(r, v.speed) <= deadline
        if r > 0:  # and the next smaller ratio would not have fit
            assert total(m.rcfg.ratios[m.rcfg.ratios.index(r) - 1], v.speed) > deadline
    with pytest.raises(FlexrayError, match="method.proxy_samples"):
        _method(digits, proxy_samples=5000)


def test_ensemble_distillation_pulls_the_global_model_to_the_teachers(digits):
    m, state = _method(digits, distill_steps=30, proxy_samples=300, distill_lr=1e-3)
    tasks = m.plan(0, [DeviceView(i, CATALOG["laptop_cpu"], 1.0, 100) for i in range(3)], state)
    ups = []
    for t, ratio in zip(tasks, (0.0, 0.4, 0.6)):
        t = type(t)(t.device, 0, SubModel(Pruned(ratio)))
        ctx = DeviceContext(lambda: cnn(digits.input_shape, 10, 8))
        ctx.seed(t.device)
        up = m.local_update(t, state, _shard(digits, t.device), ctx)
        up.device = t.device
        assert m.validate(up, state, t.spec) is None
        assert state_bytes(up.tensors) == up.bytes_down  # what it got is what it sends: the pruned model
        ups.append(up)
    assert state_bytes(ups[2].tensors) < 0.5 * state_bytes(state)
    teacher = m.teacher(ups)
    assert torch.allclose(teacher.sum(1), torch.ones(len(teacher)))

    def kl(s):
        model = cnn(digits.input_shape, 10, 8)
        model.load_state_dict(s)
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(model(m.proxy) / m.rcfg.temperature, 1), teacher, reduction="batchmean"))

    averaged = Reft(ReftConfig(name="reft", distill_steps=0), m.model_fn).aggregate(0, state, ups)
    distilled = m.aggregate(0, state, ups)
    assert kl(distilled) < 0.7 * kl(averaged)
    again = m.aggregate(0, state, ups)  # seeded by the round: reproducible
    assert all(torch.equal(distilled[k], again[k]) for k in state)


def test_filters_no_device_trained_feed_nothing_forward(digits):
    """With every device pruned, the global model's never-trained filters hold init weights; they
    must not feed noise into the next layer, so the global model computes its trained sub-network."""
    m, state = _method(digits, distill_steps=0)
    ups = []
    for i in range(2):
        ctx = DeviceContext(lambda: cnn(digits.input_shape, 10, 8))
        ctx.seed(i)
        up = m.local_update(_task(i, 0.5), state, _shard(digits, i), ctx)
        up.device = i
        ups.append(up)
    keep = filters.l1_keep(m.full, state, m.width(0.5))
    merged = m.aggregate(0, state, ups)
    dead = torch.ones(16, dtype=torch.bool)
    dead[keep["conv2.0"]] = False
    dead1 = torch.ones(8, dtype=torch.bool)
    dead1[keep["conv1.0"]] = False
    assert torch.equal(merged["conv1.0.weight"][dead1], state["conv1.0.weight"][dead1])  # kept, recruitable
    assert torch.equal(merged["conv2.0.bias"][dead], state["conv2.0.bias"][dead])
    assert not merged["conv2.0.weight"][:, dead1].any()
    assert not merged["head.2.weight"].view(10, 16, -1)[:, dead].any()  # but feeding nothing forward
    assert merged["head.2.weight"].view(10, 16, -1)[:, ~dead].any()
    x = _shard(digits, 5, 16).x
    full, ref = cnn(digits.input_shape, 10, 8), cnn(digits.input_shape, 10, 8)
    full.load_state_dict(merged)
    ref.load_state_dict(merged)
    with filters.masked(ref, keep):
        assert torch.allclose(full(x), ref(x), atol=1e-5)
    resumed, _ = _method(digits, distill_steps=0)  # the record of trained filters survives a resume
    resumed.load_state_dict(m.state_dict())
    assert all(torch.equal(resumed._trained[k], m._trained[k]) for k in m._trained)
    # once a device trains the whole model, nothing is silenced any more
    ctx = DeviceContext(lambda: cnn(digits.input_shape, 10, 8))
    ctx.seed(0)
    up = m.local_update(_task(0, 0.0), merged, _shard(digits, 0), ctx)
    up.device = 0
    again = m.aggregate(1, merged, [up])
    assert all(torch.equal(again[k], up.tensors[k]) for k in merged)


def _task(device, ratio):
    return Task(device=device, round=0, spec=SubModel(Pruned(ratio)))


def test_uniform_dropout_picks_the_smallest_rate_that_fits(digits):
    torch.manual_seed(0)
    m = UniformDropout(UniformDropoutConfig(name="uniform_dropout"), lambda: cnn(digits.input_shape, 10, 8))
    m.setup(ServerData(digits, np.arange(10)), None)  # type: ignore[arg-type]
    assert [p[0] == p[1] for p in m.points] == [True] * 4  # same rate in every layer
    spec = front_spec(m.layers, m.points)
    rpi3 = CATALOG["rpi3"]
    full = next(i for i, p in enumerate(m.points) if p[0] == 0.0)
    dl, _, ul = predict_times(rpi3, 1.0, Workload(), m.model_bytes(), m.model_bytes())
    deadline = dl + ul + 1.01 * compute_seconds(rpi3, m.point_work(front_of(spec), full, 100), 3.0)  # no dropout just fits at 3x
    picks = [m.points[m.choose(front_of(spec), DeviceView(0, rpi3, s, 100, deadline), 100)][0] for s in (3.0, 1.0, 0.5, 0.01)]
    assert picks == sorted(picks) and picks[0] == 0.0 and picks[-1] == 0.75


def test_reft_job_uploads_fewer_bytes_and_learns(ray_cluster, mlflow_uri, tmp_path):
    tree = job_tree(
        # on the rpi3's per-layer clock 200 samples take 0.109 s unpruned, 0.083 s at ratio 0.6, 0.072 s at
        # 0.8 (download and upload included): it prunes to 0.8; a laptop takes 0.013 s unpruned
        tracking__uri=mlflow_uri, rounds__num=4, rounds__deadline_s=0.08, rounds__stragglers="drop",
        data__samples_per_device=200,
        method={"name": "reft", "batch_size": 32, "lr": 0.1, "momentum": 0.5, "proxy_samples": 300,
                "distill_steps": 20},
    )
    res = run_job(parse_config(tree))
    events = pq.read_table(MlflowClient(mlflow_uri).download_artifacts(res.run_id, "events.parquet", str(tmp_path)))
    rows = events.to_pylist()
    full = state_bytes(cnn((1, 8, 8), 10, 8).state_dict())
    rpi = [r for r in rows if r["profile"] == "rpi3"]
    laptop = [r for r in rows if r["profile"] == "laptop_cpu"]
    assert all(r["status"] == "ok" for r in rows)  # pruned to fit: no stragglers
    assert all(r["bytes_up"] < 0.6 * full for r in rpi) and all(r["bytes_up"] == full for r in laptop)
    accs = [h.accuracy for h in res.history]
    assert accs[-1] > max(0.3, accs[0])
