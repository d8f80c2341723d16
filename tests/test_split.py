"""Split points, split-vs-whole gradients, and the TLMP scheduler (pure computation, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flexray.config import JobConfig, ModelConfig
from flexray.fleet.profiles import CATALOG
from tests.synthetic import random_clients
from flexray.models import build_model, profile_model
from flexray.models.split import split_model, split_points, stage_names
from flexray.protocol import DeviceProfile, StepProfile, SubModel, Task, Workload
from flexray.schedule.tlmp import Clients, baselines, brute_force, exact_minmax, fit_cuts, min_target, terms, tlmp
from flexray.methods.split_server import LocalPort, ServerSpec, Split, SplitServerHost

SERVER = CATALOG["edge_gpu_server"]
MODELS = [("cnn", (1, 8, 8)), ("resnet8", (3, 16, 16)), ("torchvision:mobilenet_v2", (3, 32, 32))]


@pytest.fixture(scope="module")
def resnet_points(one_torch_thread):
    model = build_model(ModelConfig(name="resnet8"), (3, 32, 32), 10)
    return split_points(profile_model(model, (3, 32, 32)), 32)


@pytest.fixture(scope="module")
def resnet18(one_torch_thread):
    model = build_model(ModelConfig(name="torchvision:resnet18"), (3, 32, 32), 10)
    return stage_names(model), split_points(profile_model(model, (3, 32, 32)), 32)


def _fleet(n: int, seed: int, points, tight_memory: float = 0.3) -> Clients:
    """Random catalog devices at random speeds, some with memory for only the first cuts."""
    return random_clients(n, np.random.default_rng(seed), points, tight_share=tight_memory)


# ---------------------------------------------------------------- split points


@pytest.mark.parametrize(("name", "shape"), MODELS[:2])
def test_split_points_account_for_the_whole_model(one_torch_thread, name, shape):
    model = build_model(ModelConfig(name=name, width=8), shape, 10)
    prof = profile_model(model, shape)
    pts = split_points(prof, 16)
    assert [p.cut for p in pts] == list(range(1, len(prof.layers) + 1))
    for p in pts:
        assert p.client_flops + p.server_flops == pytest.approx(prof.train_flops_per_sample, rel=1e-9)
        assert p.client_model_bytes + p.server_model_bytes == prof.param_bytes
        client, _ = split_model(model, p.cut)
        assert p.client_model_bytes == sum(t.numel() * t.element_size() for t in client.state_dict().values())
    for p in pts[:-1]:  # a real split ships the cut's activations
        client, _ = split_model(model, p.cut)
        h = client(torch.zeros(2, *shape))
        assert p.smashed_bytes == h[0].numel() * 4 and p.split
    last = pts[-1]
    assert not last.split and last.smashed_bytes == 0 and last.server_flops == 0  # cut = L is plain FL
    whole = prof.step.step(16).features()
    for p in pts[:-1]:  # the two parts' kernels are the whole step's, with a step on each side
        both = (p.client_step.step(16) + p.server_step.step(16)).features()
        assert both[1:] == pytest.approx(whole[1:], rel=1e-6) and both[0] == whole[0] + 1
    assert last.client_step == prof.step and last.server_step.step(16) == Workload()
    mem = [p.client_memory_bytes for p in pts]
    assert mem == sorted(mem)


def test_split_model_rejects_bad_cuts():
    model = build_model(ModelConfig(name="cnn", width=4), (1, 8, 8), 10)
    with pytest.raises(ValueError, match="cut must be in 1..3"):
        split_model(model, 0)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(("name", "shape"), MODELS)
def test_split_training_gives_the_whole_models_gradients(one_torch_thread, name, shape):
    """Same batch, same weights: client part + server part through the server host give the
    gradients (and, after one SGD step, the weights) of training the model whole."""
    torch.manual_seed(0)
    whole = build_model(ModelConfig(name=name, width=8), shape, 10)
    state = {k: v.clone() for k, v in whole.state_dict().items()}
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    whole.train()
    torch.manual_seed(5)  # the same dropout masks (mobilenet's classifier) in both runs
    nn.functional.cross_entropy(whole(x), y).backward()
    ref = {n: p.grad.clone() for n, p in whole.named_parameters()}
    cfg = JobConfig.model_validate({"model": {"name": name, "width": 8}, "fleet": {"groups": [{"profile": "rpi4"}]}})
    L = len(whole)
    cuts = range(1, L) if L <= 6 else (1, 2, L // 2, L - 2, L - 1)  # mobilenet has 19 stages: a spread
    for cut in cuts:
        spec = ServerSpec(shared=False, server_steps=(StepProfile(Workload(steps=1.0), Workload()),) * L, lr=0.1)
        host = SplitServerHost(cfg, spec, shape, 10, SERVER)
        host.begin_round(0, state, [Task(0, 0, SubModel(Split(cut, 1.0)))])
        model = build_model(ModelConfig(name=name, width=8), shape, 10)
        model.load_state_dict(state)
        model.train()
        client, _ = split_model(model, cut)
        torch.manual_seed(5)
        h = client(x)
        grad, _loss = LocalPort(host, 0)(h.detach(), y)
        h.backward(grad)
        got = {n: p.grad for n, p in client.named_parameters()}
        got.update({n: p.grad for n, p in split_model(host.models[0], cut)[1].named_parameters()})
        assert set(got) == set(ref)
        for n, g in ref.items():
            assert torch.allclose(got[n], g, atol=1e-5, rtol=1e-5), (name, cut, n, float((got[n] - g).abs().max()))
        # The server stepped its part with SGD(lr=0.1): its weights are what a whole step gives.
        for n, p in split_model(host.models[0], cut)[1].named_parameters():
            assert torch.allclose(p, state[n] - 0.1 * ref[n], atol=1e-5), (name, cut, n)


# ---------------------------------------------------------------- TLMP


def test_cut_regression_is_fitted_and_reports_its_error(resnet_points):
    fit = fit_cuts(resnet_points)
    assert fit is not None and fit.max_cut == len(resnet_points) - 1
    assert np.isfinite(fit.error) and fit.error > 0  # leave-one-out: resnet stages are far from smooth
    x = np.array([p.cut for p in resnet_points if p.split], dtype=float)
    c, s, up, _down, m = fit.at(x)  # through the true costs at the integer cuts
    split = [p for p in resnet_points if p.split]
    assert np.allclose(c, [p.client_flops for p in split], rtol=1e-9)
    assert np.allclose(s, [p.server_flops for p in split], rtol=1e-9)
    assert np.allclose(up, [p.uplink_bytes_per_sample for p in split], rtol=1e-9)
    assert np.allclose(m, [p.client_model_bytes for p in split], rtol=1e-9)
    mid = fit.at(x[:-1] + 0.5)[0]  # and continuous in between
    assert np.all((mid >= np.minimum(c[:-1], c[1:])) & (mid <= np.maximum(c[:-1], c[1:])))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tlmp_respects_shares_and_memory(resnet_points, seed):
    clients = _fleet(300, seed, resnet_points, tight_memory=0.5)
    plan = tlmp(clients, resnet_points, SERVER)
    assert plan.theta.min() >= 0 and plan.theta.sum() <= 1 + 1e-9
    need = np.array([resnet_points[c - 1].client_memory_bytes for c in plan.cuts])
    assert np.all(need <= clients.memory_bytes)
    assert (plan.cuts < len(resnet_points)).any()  # tight memory forces some splits
    split = plan.cuts < len(resnet_points)
    assert np.all(plan.theta[split] > 0) and np.all(plan.theta[~split] == 0)
    tm = terms(clients, resnet_points, SERVER)
    assert np.allclose(plan.latency, tm.latency(plan.cuts, np.maximum(plan.theta, 1e-300)))
    base = baselines(clients, resnet_points, SERVER)
    assert plan.max_latency <= min(base.values()) * (1 + 1e-9)
    assert plan.max_latency <= exact_minmax(clients, resnet_points, SERVER).max_latency * 1.01


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_tlmp_is_within_one_percent_of_brute_force(resnet_points, seed):
    clients = _fleet(5, seed, resnet_points)
    plan = tlmp(clients, resnet_points, SERVER)
    best, cuts = brute_force(clients, resnet_points, SERVER, grid=2000)
    assert np.isfinite(best) and len(cuts) == 5
    assert plan.max_latency <= best * 1.01


def test_tlmp_names_a_client_that_cannot_train_at_all(resnet_points):
    clients = _fleet(4, 0, resnet_points)
    clients.memory_bytes[2] = 1.0
    from flexray.errors import FlexrayError

    with pytest.raises(FlexrayError, match="client 2 cannot hold even the first stage"):
        tlmp(clients, resnet_points, SERVER)


def test_tlmp_is_deterministic(resnet_points):
    a = tlmp(_fleet(50, 5, resnet_points), resnet_points, SERVER)
    b = tlmp(_fleet(50, 5, resnet_points), resnet_points, SERVER)
    assert np.array_equal(a.cuts, b.cuts) and np.array_equal(a.theta, b.theta)


# ---------------------------------------------------------------- block-granular cuts of torchvision models

# (model, stages): stem + one stage per residual / (Fused)MBConv / inverted-residual block + head.
BLOCK_STAGES = [("resnet18", 10), ("mobilenet_v2", 20), ("efficientnet_b0", 19), ("efficientnet_v2_s", 43)]


@pytest.mark.parametrize(("name", "stages"), BLOCK_STAGES)
def test_torchvision_models_cut_between_blocks(one_torch_thread, name, stages):
    model = build_model(ModelConfig(name=f"torchvision:{name}"), (1, 32, 32), 10)
    names = stage_names(model)
    assert len(names) == stages  # one stage per block: the staged forward matched the original (tv.py)
    pts = split_points(profile_model(model, (1, 32, 32)), 16)
    fit = fit_cuts(pts)
    assert len(pts) == stages and fit is not None and fit.max_cut == stages - 1  # regression sees every cut
    if name.startswith("efficientnet"):  # torchvision's block groups survive as the name prefix
        assert "features1_0" in names and len({n.split("_")[0] for n in names}) < len(names)


def test_resnet18_has_a_cut_after_every_block(resnet18):
    names, pts = resnet18
    blocks = [f"layer{i}_{j}" for i in range(1, 5) for j in range(2)]
    assert names == ["stem", *blocks, "head"]
    assert sum(p.split for p in pts) >= 9  # stem + 8 blocks (was stem + 4 layers)
    assert sorted({n.split("_")[0] for n in blocks}) == ["layer1", "layer2", "layer3", "layer4"]


def test_tlmp_cuts_inside_a_resnet_layer_when_that_is_the_min_max_optimum(resnet18):
    """Devices with memory up to layer2's first block and a slow uplink: cutting after layer2_0
    ships half of layer1's activations and fits, layer2_1 does not fit, so the optimum is a cut
    torchvision's layer2 used to hide; TLMP, the exact solver and brute force all find it."""
    names, pts = resnet18
    n, cut = 3, names.index("layer2_0") + 1
    devices = [DeviceProfile(f"c{i}", f, int(pts[cut - 1].client_memory_bytes), 2e6, 2e7, 1.0, 1.0, 1.0)
               for i, f in enumerate((5e9, 4e9, 6e9))]  # FLOP/s only: the coarse clock
    samples = np.array([500.0, 400.0, 600.0])
    clients = Clients.of(devices, [1.0] * n, samples, np.ceil(samples / 32))
    plan = tlmp(clients, pts, SERVER)
    assert plan.cuts.tolist() == [cut] * n and names[cut] == "layer2_1"  # the cut splits layer2
    assert exact_minmax(clients, pts, SERVER).cuts.tolist() == [cut] * n
    best, best_cuts = brute_force(clients, pts, SERVER, grid=2000)
    assert best_cuts.tolist() == [cut] * n and plan.max_latency <= best * (1 + 1e-6)
    tm = terms(clients, pts, SERVER)
    coarse = np.array([names.index(g) + 1 for g in ("stem", "layer1_1", "layer2_1", "layer3_1", "layer4_1", "head")])
    coarse_best = min_target(tm.A[:, coarse - 1], tm.B[:, coarse - 1])[0]
    assert plan.max_latency < 0.95 * coarse_best  # the stage-level cuts alone lose > 5%
