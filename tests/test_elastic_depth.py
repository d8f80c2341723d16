"""FlexTrain as the paper wrote it: depth prefixes of any residual model (torchvision ResNets, a
ViT), Algorithm 2's aggregation (sync and async), the weakest tier without self-distillation,
stochastic depth in centralised mode; plan and one Ray round on the new models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from flexray.config import ModelConfig
from flexray.errors import FlexrayError
from flexray.fleet.profiles import CATALOG
from flexray.methods import flextrain
from flexray.methods.base import DeviceContext
from flexray.methods.flextrain import FlexTrain
from flexray.methods.policy import Arrivals, AsyncPolicy
from flexray.models import build_model, depth
from flexray.models.resnet_cifar import ShortcutA
from flexray.protocol import DeviceView, LocalData, SubModel, Task, Update
from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job
from flexray.methods.flextrain import Depth
from tests.conftest import job_tree
from tests.test_cli import parse_table, run_main

DIGITS, CIFAR = (1, 8, 8), (3, 32, 32)
NEW_MODELS = [("torchvision:resnet18", DIGITS), ("vit", DIGITS), ("vit", CIFAR)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Single-threaded torch for the whole module (see conftest.one_torch_thread)."""


def build(name: str, shape: tuple[int, int, int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name, width=16, depth=3), shape, 10)


def make(model: str = "resnet8", cls: type[FlexTrain] = FlexTrain, **opts: object) -> tuple[FlexTrain, dict, object]:
    cfg = cls.Config.model_validate({"name": cls.name, "local_epochs": 1, "batch_size": 32, "lr": 0.05, **opts})

    def model_fn() -> nn.Module:
        return build(model, DIGITS)

    method = cls(cfg, model_fn)
    return method, method.init(model_fn()), model_fn


def data(n: int = 64, seed: int = 0) -> LocalData:
    g = torch.Generator().manual_seed(seed)
    return LocalData(torch.randn(n, *DIGITS, generator=g), torch.randint(0, 10, (n,), generator=g))


def train(method: FlexTrain, task: Task, state: dict, local: LocalData, model_fn) -> Update:
    ctx = DeviceContext(model_fn)
    ctx.seed(task.device)
    return method.local_update(task, state, local, ctx)


# ---------------------------------------------------------------- prefixes of any residual model


@pytest.mark.parametrize("name,shape", NEW_MODELS, ids=["resnet18", "vit-digits", "vit-cifar"])
def test_prefixes_of_torchvision_resnets_and_vit_share_the_global_tensors(name: str, shape) -> None:
    full = build(name, shape).eval()
    blocks = depth.block_names(full)
    assert len(blocks) == (8 if "resnet" in name else 3)
    x = torch.randn(2, *shape)
    glob = full.state_dict()
    with torch.no_grad():
        assert torch.equal(depth.depth_prefix(full, len(blocks))(x), full(x))
        for k in range(len(blocks) + 1):
            prefix = depth.depth_prefix(full, k)
            assert prefix(x).shape == (2, 10)
            assert depth.prefix_keys(full, k) == [key for key in glob if key.split(".")[0] not in blocks[k:]]
            assert all(v.data_ptr() == glob[key].data_ptr() for key, v in prefix.state_dict().items())


def test_a_skipped_downsampling_block_leaves_a_parameter_free_zero_pad() -> None:
    """resnet18's layer2_0 has a 1x1 projection; a prefix ending before it holds none of it."""
    full = build("torchvision:resnet18", DIGITS).eval()
    prefix = depth.depth_prefix(full, 2)  # layer1_0, layer1_1
    assert not any("downsample" in key or key.startswith("layer2") for key in prefix.state_dict())
    pads = [m for m in prefix.skip if isinstance(m, ShortcutA)]
    assert [(p.stride, p.extra) for p in pads] == [(2, 64), (2, 128), (2, 256)]  # 64 -> 128 -> 256 -> 512
    assert depth.shortcut(full.layer1_1) is None and depth.shortcut(build("vit", DIGITS).block1) is None


@pytest.mark.parametrize("name", ["cnn", "vgg", "lenet"])
def test_non_residual_models_are_refused_in_one_line(name: str) -> None:
    with pytest.raises(FlexrayError, match="config error: model.name: .*residual.*vit") as err:
        depth.block_names(build(name, DIGITS))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- Algorithm 2's aggregation


def _example(method: FlexTrain, state: dict) -> list[Update]:
    """ResNet-20: two k = 1 devices and one k = 3 device; block 3 (layer1_3) is 0 globally, 5.0 on the k = 3 device."""
    ups = []
    for k, value in [(1, 1.0), (1, 1.0), (3, 5.0)]:
        tensors = {key: torch.full_like(state[key], value) for key in method.keys(k)}
        ups.append(Update(tensors, 1.0, 10, metrics={"k": float(k)}, trained=SubModel(Depth(k))))
    return ups


def test_paper_aggregation_averages_over_every_device_of_the_round() -> None:
    paper, state, _ = make("resnet20")
    coverage, _, _ = make("resnet20", aggregation="coverage")
    state = {key: torch.zeros_like(v) for key, v in state.items()}
    block3 = "layer1_3.conv1.weight"
    a, b = paper.aggregate(0, state, _example(paper, state)), coverage.aggregate(0, state, _example(paper, state))
    assert a[block3].unique().tolist() == pytest.approx([5 / 3]) and b[block3].unique().tolist() == [5.0]
    stem = "stem.0.weight"  # every device trained it: both rules give the plain mean
    assert torch.allclose(a[stem], torch.full_like(a[stem], 7 / 3)) and torch.equal(a[stem], b[stem])
    untrained = "layer2_1.conv1.weight"  # block 4: nobody trained it, both rules keep it
    assert torch.equal(a[untrained], state[untrained]) and torch.equal(b[untrained], state[untrained])


def test_paper_aggregation_in_async_rounds() -> None:
    """FedBuff: the buffer is the round (5/3 vs 5.0); FedAsync: one arrival, both rules mix in the same."""
    paper, state, _ = make("resnet20")
    coverage, _, _ = make("resnet20", aggregation="coverage")
    state = {key: torch.zeros_like(v) for key, v in state.items()}
    block3 = "layer1_3.conv1.weight"
    out = {}
    for name, method in (("paper", paper), ("coverage", coverage)):
        buf = Arrivals(AsyncPolicy(kind="fedbuff", buffer_size=3, staleness="constant"), method)
        results = [buf.arrive(0, state, state, [u], 0) for u in _example(method, state)]
        assert results[:2] == [None, None]
        out[name] = results[2]
        mix = Arrivals(AsyncPolicy(kind="fedasync", alpha=0.5, staleness="constant"), method)
        mixed = mix.arrive(0, state, state, [_example(method, state)[2]], 0)
        assert mixed[block3].unique().tolist() == [2.5] == mixed["stem.0.weight"].unique().tolist()
        assert not mixed["layer2_1.conv1.weight"].any()  # untrained: the current global value
    assert out["paper"][block3].unique().tolist() == pytest.approx([5 / 3])
    assert out["coverage"][block3].unique().tolist() == [5.0]


# ---------------------------------------------------------------- the weakest tier, stochastic depth


def test_the_weakest_tier_trains_on_labels_only_and_the_anchor_stays_an_option() -> None:
    method, state, model_fn = make(depths={"rpi3": 2, "laptop_cpu": 3})
    views = [DeviceView(0, CATALOG["rpi3"], 1.0, 64), DeviceView(1, CATALOG["laptop_cpu"], 1.0, 64)]
    tasks = method.plan(0, views, state)
    assert [t.spec for t in tasks] == [SubModel(Depth(2, flextrain.LABELS)), SubModel(Depth(3))]
    local = data()
    plain, _, _ = make(beta=0.0)
    weakest = train(method, tasks[0], state, local, model_fn)
    same = train(plain, Task(0, 0, SubModel(Depth(2))), state, local, model_fn)
    distilled = train(method, Task(0, 0, SubModel(Depth(2))), state, local, model_fn)
    assert all(torch.equal(weakest.tensors[q], same.tensors[q]) for q in same.tensors)  # CE only
    assert any(not torch.equal(weakest.tensors[q], distilled.tensors[q]) for q in same.tensors)
    assert weakest.flops == same.flops < distilled.flops and method.validate(weakest, state) is None
    anchored, _, _ = make(depths={"rpi3": 2, "laptop_cpu": 3}, anchor=1.0)
    with_anchor = train(anchored, tasks[0], state, local, model_fn)
    assert any(not torch.equal(with_anchor.tensors[q], same.tensors[q]) for q in same.tensors)


def test_stochastic_depth_in_centralised_mode() -> None:
    assert depth.drop_probs(4, 0.5).tolist() == [0.125, 0.25, 0.375, 0.5]
    _, state, model_fn = make()
    local = data()
    runs = {}
    for p in (0.0, 0.9):
        method, _, _ = make(mode="centralised", pi=[0.0, 0.0, 1.0], stochastic_depth=p)
        task = method.plan(0, [DeviceView(0, CATALOG["rpi4"], 1.0, 64)], state)[0]
        runs[p] = [train(method, task, state, local, model_fn) for _ in range(2)]
    a, b = runs[0.9]
    assert all(torch.equal(a.tensors[q], b.tensors[q]) for q in state)  # seeded by the device's generator
    assert any(not torch.equal(a.tensors[q], runs[0.0][0].tensors[q]) for q in state)
    full = build("resnet8", DIGITS).eval()
    dropped = depth.depth_subnet(full, [True, False, True])  # block 2 leaves its zero-pad shortcut
    x = torch.randn(2, *DIGITS)
    with torch.no_grad():
        want = full.head(full.layer3_1(ShortcutA(16, 32, 2)(full.layer1_1(full.stem(x)))))
        assert torch.equal(dropped(x), want)
    with pytest.raises(FlexrayError, match="config error: method.stochastic_depth: .*centralised"):
        make(stochastic_depth=0.5)[0].check()


# ---------------------------------------------------------------- plan and one Ray round


def _job(model: str, method: str) -> dict:
    return job_tree(model={"name": model, "width": 16, "depth": 3},
                    method={"name": method, "local_epochs": 1, "batch_size": 32, "lr": 0.05},
                    schedule={"mode": "static"}, rounds__num=1)


@pytest.mark.parametrize("model", ["torchvision:resnet18", "vit"])
@pytest.mark.parametrize("method", ["flextrain", "fedclass"])
def test_plan_gives_depth_prefixes_on_the_new_models(model: str, method: str, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(model, method)))
    rc, out = run_main(["plan", str(path)])
    assert rc == 0, out
    rows = parse_table(out)
    assert len(rows) == 4 and all(float(r["total_s"]) > 0 and r["fits_mem"] == "yes" for r in rows)
    ks = {r["device"].rsplit("-", 1)[0]: int(r["plan"].removeprefix("k=")) for r in rows}
    assert 1 <= ks["rpi3"] < ks["laptop_cpu"] <= (8 if "resnet" in model else 3)


@pytest.mark.ray
def test_one_round_of_flextrain_on_a_vit_through_ray(ray_cluster, mlflow_uri) -> None:
    tree = _job("vit", "flextrain")
    cfg = parse_config({**tree, "tracking": {**tree["tracking"], "uri": mlflow_uri}})
    res = run_job(cfg)
    last = res.history[-1]
    assert {"acc_k1", "acc_k2", "acc_k3", "mean_device_acc"} <= set(last.as_dict()) and last.extra["acc_k3"] == last.accuracy
