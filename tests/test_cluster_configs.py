"""What an operator runs: cluster YAMLs, the KubeRay manifest, join-device.sh, ``flexray probe``,
and the placement logic that needs no cluster (fake nodes). Fast: no Ray cluster is started."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from flexray.errors import FlexrayError
from flexray.fleet.fleet import ActorSpec
from flexray.fleet.placement import Node, actor_options, check_placement, check_selector, selector_matches
from tests.conftest import REPO, job_tree

CLUSTER = REPO / "cluster"
LAUNCHER = ["lab.yaml", "aws.yaml", "gcp.yaml"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_configs_validate_and_are_secured(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(raw))  # Ray's own schema, after filling the provider's defaults
    assert raw["cluster_name"].startswith("flexray")
    provider = raw["provider"]["type"]
    assert provider == {"lab.yaml": "local", "aws.yaml": "aws", "gcp.yaml": "gcp"}[name]
    if provider == "local":
        assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
        assert raw["max_workers"] == len(raw["provider"]["worker_ips"])
    else:
        types = raw["available_node_types"]
        assert raw["head_node_type"] in types and len(types) >= 2
        assert all("node_config" in t and "resources" in t for t in types.values())
        assert any(k.startswith("device:") for t in types.values() for k in t["resources"])
    assert any("pip install" in c and "flexray" in c for c in raw["setup_commands"])
    assert raw["file_mounts"]["~/flexray"] == "."
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), (name, key)
    assert all("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"] if "ray start" in c)


def test_kuberay_rayjob_runs_flexray_with_token_auth():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("flexray run ")
    job_file = job["spec"]["entrypoint"].split()[2].replace("/home/ray/flexray/", "")
    assert (REPO / job_file).is_file()  # the image copies the repository to /home/ray/flexray
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    major, minor, *_ = (int(x) for x in cluster["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)
    head_env = {e["name"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= head_env
    assert all(g["template"]["spec"]["containers"] for g in cluster["workerGroupSpecs"])
    docker = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{cluster['rayVersion']}" in docker and "pip install" in docker


def _join(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER / "join-device.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=30)


def test_join_device_advertises_resource_and_label(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_AUTH_TOKEN": "t"}
    out = _join("10.0.0.1:6379", "rpi4", "--num-cpus", "4", "--dry-run", "--", "--block", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("ray start --address 10.0.0.1:6379 --num-cpus 4 --resources '{\"device:rpi4\": 1}' "
                                  "--labels flexray.io/device=rpi4 --disable-usage-stats --block")
    no_token = _join("h:6379", "rpi4", "--dry-run", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert no_token.returncode == 2 and "no Ray auth token" in no_token.stderr
    bad = _join("h:6379", "rpi 4", "--dry-run", env=env)
    assert bad.returncode == 2 and "device class" in bad.stderr


def test_probe_prints_a_profile_line_that_validates(capsys):
    from flexray.cli import main
    from flexray.runtime.assembly import parse_config

    assert main(["probe", "--seconds", "0.3", "--name", "lab_pi", "--data", "digits", "--width", "8", "--like", "rpi4",
                 "--calibration-seconds", "0.01", "--calibration-passes", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("# flexray probe on ") and "FLOP/s" in out[0] and "latency model" in out[1]
    assert "rpi4" in out[2]
    profiles = yaml.safe_load(out[-1])
    assert set(profiles) == {"lab_pi"} and profiles["lab_pi"]["flops"] > 1e5
    assert profiles["lab_pi"]["power_active_w"] == 6.4 and profiles["lab_pi"]["rtt_s"] == 0.003  # from --like rpi4
    conv = profiles["lab_pi"]["latency"]["conv"]
    assert conv["flops_per_s"] > 1e8 and conv["kernel_s"] >= 0  # the calibrated per-layer model
    # The line pastes straight into a job: the group uses the measured profile.
    cfg = parse_config(job_tree(fleet__profiles=profiles, fleet__groups=[{"profile": "lab_pi", "count": 1}]))
    assert cfg.fleet.profiles["lab_pi"].flops == profiles["lab_pi"]["flops"]
    assert cfg.fleet.profiles["lab_pi"].latency is not None
    assert main(["probe", "--seconds", "0.1", "--coarse", "--data", "digits", "--width", "8"]) == 0
    coarse = yaml.safe_load(capsys.readouterr().out.strip().splitlines()[-1])
    assert "latency" not in next(iter(coarse.values()))  # --coarse: FLOP/s only, still a valid profile
    assert main(["probe", "--like", "toaster"]) == 2
    capsys.readouterr()
    assert main(["probe", "--calibration-passes", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calibration-passes must be >= 1" in err[0]


# ---------------------------------------------------------------- placement without a cluster

HEAD = Node("h" * 56, "10.0.0.1", {"CPU": 2.0, "device:a": 2.0, "node:__internal_head__": 1.0}, {}, True)
PI = Node("p" * 56, "10.0.0.2", {"CPU": 4.0, "device:rpi4": 1.0}, {"flexray.io/device": "rpi4"})


def test_selector_semantics_match_ray():
    labels = {"flexray.io/device": "rpi4", "zone": "lab"}
    assert selector_matches({"flexray.io/device": "rpi4"}, labels)
    assert not selector_matches({"flexray.io/device": "!rpi4"}, labels)
    assert selector_matches({"flexray.io/device": "in(jetson, rpi4)", "zone": "!cloud"}, labels)
    assert not selector_matches({"flexray.io/device": "!in(rpi4,rpi3)"}, labels)
    assert not selector_matches({"missing": "x"}, labels) and selector_matches({"missing": "!x"}, labels)
    for bad in ({"bad key!": "x"}, {"k": "in()"}, {"k": "-x"}):
        with pytest.raises(FlexrayError, match="config error: fleet.groups.0.node_labels"):
            check_selector(bad, "fleet.groups.0.node_labels")


def test_node_labels_flow_from_config_to_actor_options():
    from flexray.runtime.assembly import parse_config
    from flexray.data.datasets import load_dataset
    from flexray.fleet.fleet import assign_actors, build_fleet

    cfg = parse_config(job_tree(fleet__groups=[{"profile": "rpi4", "count": 2, "node_labels": {"flexray.io/device": "rpi4"}},
                                               {"profile": "laptop_cpu", "count": 2}]))
    specs = assign_actors(cfg, build_fleet(cfg, load_dataset(cfg.data).y_train))
    pinned = [s for s in specs if s.pinned]
    assert len(pinned) == 2 and all(len(s.devices) == 1 for s in pinned)  # one actor per real device
    assert pinned[0].label == "actor0[flexray.io/device=rpi4]"
    assert actor_options(pinned[0]) == {"num_cpus": 1.0, "label_selector": {"flexray.io/device": "rpi4"}, "resources": None}
    with pytest.raises(FlexrayError, match="node_labels.flexray.io/device"):
        parse_and_build = job_tree(fleet__groups=[{"profile": "rpi4", "node_labels": {"flexray.io/device": "r p"}}])
        build_fleet(parse_config(parse_and_build), load_dataset(cfg.data).y_train)


def test_placement_predicts_nodes_and_names_the_fix():
    pi_actor = ActorSpec(0, (0,), 1.0, {"device:rpi4": 1})
    by_label = ActorSpec(1, (1,), 1.0, {}, {"flexray.io/device": "rpi4"})
    sim = [ActorSpec(2, (2, 3), 1.0, {}), ActorSpec(3, (4, 5), 1.0, {})]
    placed = check_placement([pi_actor, by_label, *sim], [HEAD, PI])
    assert placed.node_of[0] == PI and placed.node_of[1] == PI
    assert placed.describe(0) == "10.0.0.2 pppppppp" and placed.describe(2).endswith("(1 of 2)")
    with pytest.raises(FlexrayError, match=r"no node can host actor0\[flexray.io/device=jetson\].*--labels flexray.io/device=jetson"):
        check_placement([ActorSpec(0, (0,), 1.0, {}, {"flexray.io/device": "jetson"})], [HEAD, PI])
    with pytest.raises(FlexrayError, match="the cluster has 0 device:orin but the fleet needs 1"):
        check_placement([ActorSpec(0, (0,), 1.0, {"device:orin": 1})], [HEAD, PI])
    # Pinned actors compete for the Pi's 4 CPUs; the simulated ones then do not fit on the head.
    crowd = [ActorSpec(i, (i,), 1.5, {}, {"flexray.io/device": "rpi4"}) for i in range(2)]
    assert check_placement(crowd, [HEAD, PI]).node_of[1] == PI
    with pytest.raises(FlexrayError, match="do not fit together"):
        check_placement([*crowd, ActorSpec(2, (2,), 1.5, {}, {"flexray.io/device": "rpi4"})], [HEAD, PI])
    with pytest.raises(FlexrayError, match="does not fit beside the pinned actors"):
        check_placement([*crowd, ActorSpec(2, (2,), 1.5, {}), ActorSpec(3, (3,), 1.5, {})], [HEAD, PI])


def test_unreachable_tracking_server_fails_at_once():
    import time

    from flexray.tracking.mlflow_logger import check_access
    from tests.conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(FlexrayError, match=rf"cannot reach the MLflow server at {uri} \(tracking.uri\)"):
        check_access(uri, "x")
    assert time.monotonic() - t0 < 10
    check_access("sqlite:///local.db", "x")  # local stores need no check
