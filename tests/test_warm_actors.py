"""Device actors kept between jobs (``warm_actors``), tested outside any warm scope: the other
Ray modules keep one open for their in-process jobs (conftest ``warm_ray_actors``)."""

from __future__ import annotations

import time

import pytest

from flexray.runtime.actor import warm_actors
from tests.test_driver import _run, _same

pytestmark = pytest.mark.ray


def test_warm_actors_serve_the_next_job_and_change_nothing(ray_cluster, mlflow_uri):
    """Inside ``warm_actors()`` a driver's next job with the same devices takes the previous job's
    actors (no new processes) and gets the metrics fresh actors give; the block's end kills them."""
    from ray.util.state import list_actors

    def actors(state: str | None = None) -> set[str]:
        filters = [("class_name", "=", "DeviceActor")] + ([("state", "=", state)] if state else [])
        return {a.actor_id for a in list_actors(address=ray_cluster.dashboard, filters=filters, limit=10000,
                                                raise_on_missing_output=False)}

    def none_alive() -> bool:  # ray.kill is asynchronous: give the state API a moment
        deadline = time.monotonic() + 60
        while actors("ALIVE") and time.monotonic() < deadline:
            time.sleep(0.5)
        return not actors("ALIVE")

    fresh = _run(ray_cluster, mlflow_uri, seed=3)  # outside the block: its actors die with it
    one = actors()
    assert none_alive()
    with warm_actors():
        first = _run(ray_cluster, mlflow_uri, seed=3)  # new actors, kept warm at its end
        two = actors()
        assert len(two - one) == 2 and actors("ALIVE") == two - one
        again = _run(ray_cluster, mlflow_uri, seed=3)  # the warm ones
        assert actors() == two
    assert none_alive()
    _same(fresh, first)
    _same(fresh, again)
