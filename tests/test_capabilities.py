"""The small Method core and the capabilities the runtime discovers; the one job assembly; tracking
as callbacks of the loop (a user's own callback sees every round)."""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
from mlflow.tracking import MlflowClient

from flexray.errors import FlexrayError
from flexray.methods import _PATHS, method_class
from flexray.methods.base import Method
from flexray.methods.capabilities import (
    Attaches, BatchesClients, Deploys, HasPolicy, PlanNotes, Prepares,
)
from flexray.protocol import SubModel, SubModelKnob
from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job
from flexray.runtime.job import Job
from flexray.runtime.session import Session
from flexray.tracking.callbacks import Callback, FitEnd, FitFailure, FitStart, RoundEnd
from flexray.methods.service import RoundService
from flexray.methods.width import Width
from tests.conftest import job_tree
from tests.test_async_policy import _heterofl, _slice_update

pytestmark = pytest.mark.usefixtures("warm_ray_actors")  # in-process jobs reuse device actors (conftest)

CAPABILITIES = {"knob": SubModelKnob, "attaches": Attaches, "prepares": Prepares, "deploys": Deploys, "policy": HasPolicy, "plan_notes": PlanNotes, "batches": BatchesClients}


def _caps(name: str, model: str = "cnn") -> set[str]:
    job = Job.assemble(parse_config(job_tree(method__name=name, model__name=model)))
    method = job.method()
    caps = {cap for cap, proto in CAPABILITIES.items() if isinstance(method, proto)}
    return caps | ({"service"} if type(method.round_service()) is not RoundService else set())


def test_the_core_has_no_optional_hook() -> None:
    """What only some methods do is not on the base class, so ``isinstance`` tells the truth."""
    core = {n for n, _ in inspect.getmembers(Method) if not n.startswith("_")}
    for proto in CAPABILITIES.values():
        extra = {n for n in dir(proto) if not n.startswith("_")} - {"cost"}
        assert not extra & core, (proto.__name__, extra & core)
    assert {"plan", "aggregate", "evaluate", "local_update", "state_dict", "load_state_dict"} <= core


@pytest.mark.parametrize(("name", "expected"), [
    ("fedavg", {"batches"}),
    ("fedasync", {"policy", "batches"}),
    ("fedbuff", {"policy", "batches"}),
    ("heterofl", {"knob", "deploys", "batches"}),
    ("fjord", {"knob", "deploys", "batches"}),
    ("flextrain", {"knob", "deploys", "batches"}),
    ("distreal", {"prepares"}),
    ("reft", {"prepares"}),
    ("splitfed", {"attaches", "plan_notes", "service"}),
])
def test_each_method_shows_the_capabilities_it_has(name: str, expected: set[str]) -> None:
    assert _caps(name, "resnet8" if name == "flextrain" else "cnn") == expected


def test_every_registered_method_is_a_method_with_its_own_config_type() -> None:
    for name in _PATHS:
        cls = method_class(name)
        assert issubclass(cls, Method) and cls.name == name
        assert cls.Config.model_fields["lr"] is not None  # a MethodConfig subclass


def test_the_assembly_refuses_before_ray_and_plans_with_the_run_s_objects() -> None:
    with pytest.raises(FlexrayError, match="method.cut"):  # SplitFed's cut is checked against the model at assembly
        Job.assemble(parse_config(job_tree(method__name="splitfed", method__scheduler="fixed", method__cut=9)))
    job = Job.assemble(parse_config(job_tree(method__name="splitfed")))
    a, b = job.method(), job.method()
    assert a is not b and a.points == b.points  # fresh instances, attached to the same profile
    assert job.model_profile is job.model_profile  # profiled once per job


class Recorder(Callback):
    def __init__(self) -> None:
        self.rounds: list[int] = []
        self.lasts: list[bool] = []
        self.fit: FitEnd | None = None
        self.started: FitStart | None = None
        self.failure: FitFailure | None = None
        self.fail_at: int | None = None  # raise in this round's hook: the run fails there

    def on_fit_start(self, start: FitStart) -> None:
        self.started = start

    def on_exception(self, failure: FitFailure) -> None:
        self.failure = failure

    def on_round_end(self, end: RoundEnd) -> None:
        self.rounds.append(end.round)
        self.lasts.append(end.last)
        assert end.snapshot().round == end.round
        if end.round == self.fail_at:
            raise RuntimeError("stop here")

    def on_fit_end(self, end: FitEnd) -> None:
        self.fit = end


@pytest.mark.ray
def test_a_users_callback_sees_every_round_and_the_end(ray_cluster, mlflow_uri) -> None:
    rec = Recorder()
    res = run_job(parse_config(job_tree(tracking__uri=mlflow_uri, rounds__num=3, tracking__checkpoint_every=3)),
                  callbacks=[rec])
    assert rec.rounds == [1, 2, 3] and rec.lasts == [False, False, True]
    assert rec.fit is not None and tuple(rec.fit.history) == res.history and len(rec.fit.events) == 3 * 4
    assert rec.started is not None and not rec.started.resumed and rec.failure is None
    assert res.metrics is res.history[-1] and res.metrics.round == 3 and res.metrics.accuracy is not None
    assert res.checkpoint is not None and res.checkpoint.endswith("checkpoints/checkpoint.pt") and res.error is None

    # A failure reaches every callback (the last finished round with it) and the run is FAILED, not RUNNING.
    failing = Recorder()
    failing.fail_at = 2
    cfg = parse_config(job_tree(tracking__uri=mlflow_uri, rounds__num=3, tracking__checkpoint_every=0))
    res = Session(cfg).fit(callbacks=[failing], raise_on_error=False)
    assert isinstance(res.error, RuntimeError) and failing.failure is not None and failing.failure.error is res.error
    assert failing.failure.last is not None and failing.failure.last.round == 2 and [m.round for m in res.history] == [1, 2]
    assert res.checkpoint is None and failing.fit is None
    assert MlflowClient(mlflow_uri).get_run(res.run_id).info.status == "FAILED"


def test_the_server_reads_what_an_update_trained_from_its_typed_record_not_its_metrics() -> None:
    method = _heterofl()
    state = method.init(method.full)
    up = _slice_update(method, state, 0.5, 0.1)
    assert up.trained == SubModel(Width(0.5)) and up.metrics["rate"] == 0.5
    assert "no allowed width rate" in (method.validate(replace(up, trained=None), state) or "")  # metrics alone: refused
    wider = replace(up, trained=SubModel(Width(1.0)))  # the record, not the metrics, says which slice it is
    assert "rate 1.0" in (method.validate(wider, state) or "")


def test_the_plan_check_needs_no_memory_of_the_plan() -> None:
    """An actor's instance never planned anything; given the task's spec it rejects a sub-model
    other than the planned one exactly as the driver's does (sync, async and on the actor)."""
    driver_side, actor_side = _heterofl(), _heterofl()
    state = driver_side.init(driver_side.full)
    driver_side.plan(0, [], state)
    up = _slice_update(driver_side, state, 0.5, 0.1)
    for method in (driver_side, actor_side):
        assert "trained rate 0.5, planned 1.0" in (method.validate(up, state, SubModel(Width(1.0))) or "")
        assert method.validate(up, state, SubModel(Width(0.5))) == method.validate(up, state, None)


def test_the_engine_a_method_names_is_imported_by_path_and_a_wrong_one_is_one_line() -> None:
    from flexray.runtime.engines import RoundsEngine, engine_class
    from flexray.tiled.engine import TiledEngine
    from flexray.tiled.method import Tiled

    assert engine_class(method_class("fedavg")) is RoundsEngine and engine_class(Tiled) is TiledEngine

    class Lost(Tiled):
        name = "lost"
        engine = "tests.nowhere:Engine"

    with pytest.raises(FlexrayError, match="method 'lost' names engine 'tests.nowhere:Engine', which cannot be imported") as err:
        engine_class(Lost)
    assert "\n" not in str(err.value)
