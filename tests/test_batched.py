"""Batched clients (``fleet.batch_clients``): devices of one shape trained stacked with
torch.func equal client-after-client training, whatever the chunking; GPU shares in the fleet."""

from __future__ import annotations

import pytest
import torch

from flexray.cli import main
from flexray.config import MethodConfig, ModelConfig
from flexray.methods.base import LocalData, sgd_train
from flexray.methods.batched import batched_sgd_train, why_not_batched
from flexray.models import build_model
from flexray.compute import clients_per_stack
from tests.conftest import host_round

SIZES = (37, 20, 64, 9)  # unequal: different step counts and short last batches


def _clients(shape: tuple[int, int, int], seed: int = 0, dtype: torch.dtype = torch.float32) -> list[LocalData]:
    g = torch.Generator().manual_seed(seed)
    return [LocalData(torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g))
            for n in SIZES]


@pytest.mark.parametrize(("name", "mu"), [("cnn", 0.0), ("cnn", 0.1), ("lenet", 0.0), ("lenet", 0.1), ("resnet8", 0.0), ("vit", 0.1)])
def test_stacked_clients_equal_client_after_client(name: str, mu: float) -> None:
    """Plain and proximal SGD; BatchNorm (resnet8: per-client batch statistics and running
    statistics) and LayerNorm (vit) included. In float64: the two paths sum in different orders,
    and float32 rounding amplified through BatchNorm over 20 momentum steps reached 1.1e-4 on one
    machine and not on another; in float64 the same amplification stays ~1e-12."""
    shape = (1, 8, 8)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=8), shape, 10).double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = MethodConfig(batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-4, local_epochs=2)
    datas = _clients(shape, dtype=torch.float64)

    alone = []
    for i, data in enumerate(datas):
        model.load_state_dict(start)
        anchor = {n: start[n] for n, _ in model.named_parameters()}

        def prox(m: torch.nn.Module) -> torch.Tensor:
            return 0.5 * mu * sum(((p - anchor[n]) ** 2).sum() for n, p in m.named_parameters())

        seen, loss = sgd_train(model, data, cfg, torch.Generator().manual_seed(100 + i), prox if mu else None)
        alone.append(({k: v.clone() for k, v in model.state_dict().items()}, seen, loss))

    model.load_state_dict(start)
    stacked = batched_sgd_train(model, datas, cfg, [torch.Generator().manual_seed(100 + i) for i in range(len(datas))],
                                prox_mu=mu)
    worst = 0.0
    for i, ((state, seen, loss), got) in enumerate(zip(alone, stacked)):
        assert got.samples == seen == 2 * len(datas[i])
        assert got.loss == pytest.approx(loss, abs=1e-9)
        assert list(got.state) == list(state)
        worst = max(worst, max(float((got.state[k] - state[k]).abs().max()) for k in state))
    assert worst <= 1e-9, worst
    assert any(float((stacked[0].state[k] - start[k]).abs().max()) > 1e-3 for k in start)  # it did train


def test_models_with_active_dropout_train_alone() -> None:
    assert why_not_batched(build_model(ModelConfig(name="resnet8", width=8), (1, 8, 8), 10)) is None
    assert why_not_batched(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.0))) is None
    reason = why_not_batched(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)))
    assert reason is not None and "Dropout" in reason


def test_auto_stacks_on_cuda_only() -> None:
    assert clients_per_stack("auto", torch.device("cpu")) == 1
    assert clients_per_stack("auto", torch.device("cuda", 0)) == 64
    assert clients_per_stack(3, torch.device("cpu")) == 3


CHUNKED = {
    "fedavg": [], "fedprox": [], "fedbuff": [],
    "heterofl": [],  # two rates among the 4 devices, masked classifier (scaler auto: off for the no-BN lenet)
    "fedrolex": ["method.masked_classifier=true"],  # a rolled window
    "fjord": ["method.distill=true", "method.local_epochs=2"],  # a width drawn per step and client, distilled
    # depth prefixes: k=2 labels-only plus anchor (the weakest tier), k=3 with student and anchor. On ViT:
    # a BatchNorm resnet on real digits amplifies float32 rounding to ~1e-3 in one round, either way
    # (float64: 1e-13), so resnet8's BatchNorm is checked on the random data above.
    "flextrain": ["model.name=vit", "method.anchor=0.5", "method.depths.rpi4=2", "method.depths.jetson_nano=3"],
    "fedclass": ["model.name=vit", "method.depths.rpi4=2", "method.depths.jetson_nano=3"],  # each class its own keys
}


@pytest.mark.parametrize("method", list(CHUNKED))
def test_an_actor_round_does_not_depend_on_the_chunking(method: str) -> None:
    """The actor's own code path: one by one, stacks of 3 (a chunk of 3 and one of 1) and one
    stack of all 4 give the same reports and updates."""
    base = [f"method.name={method}", "model.name=lenet", "method.momentum=0.9", *CHUNKED[method]]
    runs = {}
    for chunk in (1, 3, 4):
        torch.manual_seed(0)  # host_round's global model is drawn from torch's RNG
        runs[chunk] = host_round([*base, f"fleet.batch_clients={chunk}"])
    _, _, ref_tasks, ref_reports, ref_updates = runs[1]
    assert len({t.spec for t in ref_tasks}) >= (1 if method in ("fedavg", "fedprox", "fedbuff") else 2)
    for chunk in (3, 4):
        _, _, _, reports, updates = runs[chunk]
        assert [r.status for r in reports] == [r.status for r in ref_reports]
        assert [r.samples for r in reports] == [r.samples for r in ref_reports]
        for a, b in zip(reports, ref_reports):
            assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], abs=1e-5)
            assert b.metrics["train_loss"] < 10  # it trains (a diverging run compares nothing)
            assert a.flops == pytest.approx(b.flops)  # the same kernels counted
        assert len(updates) == len(ref_updates)
        for a, b in zip(updates, ref_updates):
            assert list(a.tensors) == list(b.tensors) and a.trained == b.trained and a.bytes_down == b.bytes_down
            assert max(float((a.tensors[k].float() - b.tensors[k].float()).abs().max()) for k in a.tensors) <= 1e-5


# ---------------------------------------------------------------- GPU settings (no Ray)

QUICKSTART = "jobs/quickstart.yaml"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU for the local Ray")
def test_plan_refuses_gpu_actors_on_a_machine_without_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", QUICKSTART, "--set", "fleet.num_gpus_per_actor=0.25"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("flexray: error: config error: fleet.num_gpus_per_actor: 2 actors x 0.25 GPU need 0.5 GPUs "
                           "but this machine has 0; use 0 (CPU actors)"), line


def test_cuda_without_a_gpu_share_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", QUICKSTART, "--set", "fleet.compute_device=cuda"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "config error: fleet: compute_device: cuda needs a GPU share per actor; set fleet.num_gpus_per_actor" in line


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("method", ["fedavg", "fedprox"])
def test_cuda_actor_round_equals_the_cpu_one(method: str) -> None:
    """An actor with a whole GPU trains there (one by one, and stacked) and returns CPU updates
    equal to the CPU actor's to float tolerance."""
    base = [f"method.name={method}", "model.name=lenet", "fleet.num_gpus_per_actor=1", "method.momentum=0.9"]
    torch.manual_seed(0)
    _, _, _, cpu_reports, cpu_updates = host_round([*base, "fleet.compute_device=cpu"])
    for chunk in (1, 4):
        torch.manual_seed(0)
        _, _, _, reports, updates = host_round([*base, "fleet.compute_device=cuda", f"fleet.batch_clients={chunk}"])
        assert [r.samples for r in reports] == [r.samples for r in cpu_reports]
        for a, b in zip(updates, cpu_updates):
            assert all(v.device.type == "cpu" for v in a.tensors.values())
            assert max(float((a.tensors[k] - b.tensors[k]).abs().max()) for k in a.tensors) <= 1e-4
