"""Job config: YAML loading, ``--set`` overrides, flattening, and one-line errors (no Ray)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from flexray.config import DataConfig, DeviceGroup, JobConfig, TraceConfig, apply_overrides, flatten
from flexray.errors import FlexrayError
from flexray.runtime.assembly import load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"

# A valid minimal job; every malformed case below is a small patch on top of it.
MINIMAL: dict[str, Any] = {
    "name": "mini",
    "data": {"name": "digits", "partition": {"kind": "iid"}},
    "model": {"name": "cnn", "width": 8},
    "fleet": {"groups": [{"profile": "rpi4", "count": 2}, {"profile": "laptop_cpu", "count": 1}]},
    "method": {"name": "fedavg"},
    "rounds": {"num": 2},
}
DELETE = object()
PROFILE = {"flops": 1e9, "memory_bytes": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "power_active_w": 3.0, "power_idle_w": 1.0, "power_radio_w": 0.5}


def patched(patch: dict[str, Any]) -> dict[str, Any]:
    """MINIMAL with ``{"a.b.0.c": value}`` applied (``DELETE`` removes the key)."""
    tree = copy.deepcopy(MINIMAL)
    for dotted, value in patch.items():
        *parents, last = dotted.split(".")
        cur: Any = tree
        for k in parents:
            cur = cur[int(k)] if isinstance(cur, list) else cur.setdefault(k, {})
        if isinstance(cur, list):
            cur[int(last)] = value
        elif value is DELETE:
            del cur[last]
        else:
            cur[last] = value
    return tree


def write(tmp_path: Path, tree: Any, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree, sort_keys=False))
    return p


def one_line_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(FlexrayError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.strip() == msg and msg
    return msg


# ---------------------------------------------------------------- loading


def test_minimal_config_is_valid(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, JobConfig)
    assert [(g.profile, g.count) for g in cfg.fleet.groups] == [("rpi4", 2), ("laptop_cpu", 1)]
    assert cfg.model.width == 8 and cfg.rounds.num == 2
    # defaults filled in
    assert cfg.rounds.stragglers == "wait" and cfg.fleet.throttle == "virtual"
    assert cfg.fleet.groups[0].trace == TraceConfig()


def test_quickstart_loads() -> None:
    cfg = load_config(QUICKSTART)
    assert cfg.name == "quickstart"
    assert [g.profile for g in cfg.fleet.groups] == ["rpi4", "jetson_nano", "phone_mid", "laptop_cpu"]
    assert sum(g.count for g in cfg.fleet.groups) == 8
    assert cfg.fleet.groups[1].trace.kind == "periodic" and cfg.fleet.groups[1].trace.amplitude == 0.3
    assert cfg.fleet.groups[2].trace.kind == "random_walk" and cfg.fleet.groups[2].trace.step_s == 30
    assert cfg.data.partition.kind == "dirichlet" and cfg.data.partition.alpha == 1.0
    assert cfg.method.name == "fedavg" and cfg.method.momentum == 0.9 and cfg.method.local_epochs == 2
    assert cfg.rounds.num == 15 and cfg.tracking.experiment == "quickstart"


def test_parse_config_rejects_non_mapping() -> None:
    with pytest.raises(FlexrayError, match="mapping"):
        parse_config(["not", "a", "mapping"])  # type: ignore[arg-type]


# ---------------------------------------------------------------- --set overrides


def test_set_overrides_nested_keys_and_list_indices() -> None:
    cfg = load_config(QUICKSTART, [
        "rounds.num=3",
        "data.partition.alpha=0.25",
        "fleet.groups.0.count=3",
        "fleet.groups.1.trace.period_s=120",
        "tracking.plots=false",
        "rounds.deadline_s=12.5",  # a key absent from the YAML
        "name=a=b",  # only the first '=' splits
    ])
    assert cfg.rounds.num == 3
    assert cfg.data.partition.alpha == 0.25 and cfg.data.partition.kind == "dirichlet"  # sibling kept
    assert [g.count for g in cfg.fleet.groups] == [3, 2, 2, 2]
    assert cfg.fleet.groups[1].trace.period_s == 120 and cfg.fleet.groups[1].trace.amplitude == 0.3
    assert cfg.tracking.plots is False
    assert cfg.rounds.deadline_s == 12.5
    assert cfg.name == "a=b"


def test_set_later_override_wins_and_null_clears(tmp_path: Path) -> None:
    p = write(tmp_path, patched({"rounds.deadline_s": 30.0}))
    assert load_config(p).rounds.deadline_s == 30.0
    assert load_config(p, ["rounds.deadline_s=null"]).rounds.deadline_s is None
    assert load_config(p, ["rounds.num=4", "rounds.num=7"]).rounds.num == 7


def test_set_replaces_a_whole_list() -> None:
    cfg = load_config(QUICKSTART, ["fleet.groups=[{profile: rpi3, count: 5}, {profile: cloud_gpu}]"])
    assert [(g.profile, g.count) for g in cfg.fleet.groups] == [("rpi3", 5), ("cloud_gpu", 1)]


def test_set_values_are_yaml_typed() -> None:
    tree: dict[str, Any] = {"a": {"b": 1}}
    apply_overrides(tree, ["a.b=2", "a.f=1.5", "a.t=true", "a.n=null", "a.l=[1, 2.5, x]",
                           "a.s=hello", "a.q='3'", "a.e=", "x.y.z=1"])
    a = tree["a"]
    assert type(a["b"]) is int and a["b"] == 2
    assert type(a["f"]) is float and a["f"] == 1.5
    assert a["t"] is True
    assert a["n"] is None
    assert a["l"] == [1, 2.5, "x"]
    assert a["s"] == "hello"
    assert a["q"] == "3"
    assert a["e"] == ""
    assert tree["x"] == {"y": {"z": 1}}  # missing sections are created


def test_set_reaches_method_options() -> None:
    cfg = load_config(QUICKSTART, ["method.name=fedprox", "method.mu=0.5"])
    assert cfg.method.name == "fedprox"
    assert cfg.method.mu == 0.5  # type: ignore[attr-defined]
    assert cfg.method.momentum == 0.9  # common knobs kept


@pytest.mark.parametrize(("override", "needle"), [
    ("rounds.num", "key.path=value"),  # no '='
    ("fleet.groups.9.count=3", "index < 4"),  # index out of range
    ("fleet.groups.x.count=3", "fleet.groups is a list"),  # not an index
    ("fleet.groups.-1.count=3", "fleet.groups is a list"),  # negative index
    ("name.first=x", "name is not a section"),  # descending into a scalar
])
def test_malformed_set_is_a_one_line_error(override: str, needle: str) -> None:
    msg = one_line_error(QUICKSTART, [override])
    assert needle in msg
    assert override.split("=")[0] in msg  # names what the user typed


def test_malformed_set_raises_from_apply_overrides_too() -> None:
    with pytest.raises(FlexrayError):
        apply_overrides({"a": [1]}, ["a.1=2"])
    with pytest.raises(FlexrayError):
        apply_overrides({}, ["novalue"])


def test_set_of_an_invalid_value_is_validated() -> None:
    msg = one_line_error(QUICKSTART, ["fleet.groups.0.count=0"])
    assert msg.startswith("config error: fleet.groups.0.count:")


# ---------------------------------------------------------------- flatten, frozen


def test_flatten_gives_dotted_keys() -> None:
    tree = {"a": {"b": 1, "c": [{"d": 2}, 3]}, "e": {}, "f": [], "g": None}
    assert flatten(tree) == {"a.b": 1, "a.c.0.d": 2, "a.c.1": 3, "e": {}, "f": [], "g": None}
    assert flatten(5, "x.") == {"x": 5}


def test_flatten_of_a_job_config() -> None:
    flat = flatten(load_config(QUICKSTART).model_dump())
    assert flat["name"] == "quickstart"
    assert flat["method.name"] == "fedavg"
    assert flat["fleet.groups.0.profile"] == "rpi4"
    assert flat["fleet.groups.3.count"] == 2
    assert flat["fleet.groups.1.trace.kind"] == "periodic"
    assert flat["data.partition.alpha"] == 1.0
    assert not any(isinstance(v, (dict, list)) and v for v in flat.values())


def test_configs_are_frozen() -> None:
    cfg = load_config(QUICKSTART, ["method.name=fedprox"])
    with pytest.raises(pydantic.ValidationError):
        cfg.name = "other"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        cfg.rounds.num = 99  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        cfg.fleet.groups[0].count = 99  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        cfg.method.mu = 1.0  # type: ignore[attr-defined]
    assert cfg.name == "quickstart" and cfg.rounds.num == 15 and cfg.fleet.groups[0].count == 2


# ---------------------------------------------------------------- method options


def test_method_options_are_validated_by_the_methods_config(tmp_path: Path) -> None:
    ok = load_config(write(tmp_path, patched({"method": {"name": "fedprox"}})))
    assert type(ok.method).__name__ == "FedProxConfig" and ok.method.mu == 0.01  # type: ignore[attr-defined]
    msg = one_line_error(write(tmp_path, patched({"method": {"name": "fedprox", "mu": -1}})))
    assert msg.startswith("config error: method.mu:")
    assert "-1" in msg


def test_unknown_method_lists_known_ones(tmp_path: Path) -> None:
    from flexray.methods import METHODS

    msg = one_line_error(write(tmp_path, patched({"method.name": "fedsgd"})))
    assert msg.startswith("config error: method.name:")
    assert "fedsgd" in msg
    for known in ("fedavg", "fedprox", *METHODS):
        assert known in msg


# ---------------------------------------------------------------- malformed configs

ALLOWED_DATA = ", ".join(DataConfig.model_fields)
ALLOWED_GROUP = ", ".join(DeviceGroup.model_fields)

# (id, patch, offending dotted field, further substrings the message must contain)
MALFORMED: list[tuple[str, dict[str, Any], str, tuple[str, ...]]] = [
    # unknown keys: the message lists what is allowed there
    ("unknown-top-level", {"epochs": 3}, "epochs", ("unknown field", "fleet", "rounds", "method")),
    ("unknown-data-key", {"data.bogus": 1}, "data.bogus", ("allowed here", ALLOWED_DATA)),
    ("unknown-partition-key", {"data.partition.beta": 1}, "data.partition.beta", ("kind, alpha, shards_per_device",)),
    ("unknown-group-key", {"fleet.groups.0.cnt": 2}, "fleet.groups.0.cnt", (ALLOWED_GROUP,)),
    ("unknown-trace-key", {"fleet.groups.1.trace": {"kind": "periodic", "ampl": 1}},
     "fleet.groups.1.trace.ampl", ("kind, speed, amplitude",)),
    ("unknown-profile-key", {"fleet.profiles": {"mine": {**PROFILE, "gflops": 1}}},
     "fleet.profiles.mine.gflops", ("flops, memory_bytes",)),
    ("unknown-rounds-key", {"rounds.number": 5}, "rounds.number", ("num, mode",)),
    ("unknown-tracking-key", {"tracking.url": "x"}, "tracking.url", ("uri, experiment",)),
    ("unknown-fedavg-option", {"method.lr_typo": 0.1}, "method.lr_typo", ("fedavg", "lr", "batch_size")),
    ("fedavg-has-no-mu", {"method.mu": 0.1}, "method.mu", ("local_epochs",)),
    # wrong types
    ("seed-not-int", {"seed": "abc"}, "seed", ("'abc'",)),
    ("name-not-str", {"name": 123}, "name", ("string",)),
    ("rounds-num-word", {"rounds.num": "many"}, "rounds.num", ("integer",)),
    ("count-fractional", {"fleet.groups.0.count": 2.5}, "fleet.groups.0.count", ("2.5",)),
    ("bool-not-bool", {"tracking.log_model": "maybe"}, "tracking.log_model", ("bool",)),
    ("groups-not-list", {"fleet.groups": {"profile": "rpi4"}}, "fleet.groups", ("list",)),
    ("data-not-mapping", {"data": "digits"}, "data", ()),
    ("resources-not-numbers", {"fleet.groups.0.resources": {"device:rpi4": "one"}},
     "fleet.groups.0.resources.device:rpi4", ()),
    # out-of-range numbers
    ("rounds-num-zero", {"rounds.num": 0}, "rounds.num", ("greater than or equal to 1",)),
    ("alpha-zero", {"data.partition.alpha": 0}, "data.partition.alpha", ("greater than 0",)),
    ("fraction-above-1", {"rounds.fraction": 1.5}, "rounds.fraction", ("1.5",)),
    ("momentum-1", {"method.momentum": 1.0}, "method.momentum", ("less than 1",)),
    ("lr-negative", {"method.lr": -0.1}, "method.lr", ()),
    ("duty-zero", {"fleet.groups.0.trace": {"kind": "periodic", "duty": 0}}, "fleet.groups.0.trace.duty", ()),
    ("p-offline-2", {"fleet.groups.0.trace": {"kind": "random_walk", "p_offline": 2}},
     "fleet.groups.0.trace.p_offline", ()),
    ("actors-zero", {"fleet.actors": 0}, "fleet.actors", ()),
    ("deadline-negative", {"rounds.deadline_s": -5}, "rounds.deadline_s", ()),
    ("checkpoint-negative", {"tracking.checkpoint_every": -1}, "tracking.checkpoint_every", ()),
    ("model-width-zero", {"model.width": 0}, "model.width", ()),
    ("samples-per-device-zero", {"data.samples_per_device": 0}, "data.samples_per_device", ()),
    ("cluster-cpus-zero", {"cluster.num_cpus": 0}, "cluster.num_cpus", ()),
    ("profile-flops-negative", {"fleet.profiles": {"mine": {**PROFILE, "flops": -1}}},
     "fleet.profiles.mine.flops", ()),
    ("profile-field-missing", {"fleet.profiles": {"mine": {k: v for k, v in PROFILE.items() if k != "power_idle_w"}}},
     "fleet.profiles.mine.power_idle_w", ("required",)),
    ("negative-count", {"fleet.groups.1.count": -1}, "fleet.groups.1.count", ()),
    # bad Literal choices: the message lists the choices
    ("stragglers-choice", {"rounds.stragglers": "ignore"}, "rounds.stragglers", ("'drop'", "'wait'")),
    ("throttle-choice", {"fleet.throttle": "fast"}, "fleet.throttle", ("'virtual'", "'sleep'", "'none'")),
    ("dataset-choice", {"data.name": "imagenet"}, "data.name", ("'cifar10'",)),
    ("source-choice", {"data.source": "web"}, "data.source", ("'npz'",)),
    ("rounds-mode-choice", {"rounds.mode": "async_typo"}, "rounds.mode", ("'sync'",)),
    ("schedule-mode-choice", {"schedule.mode": "greedy"}, "schedule.mode", ("'capacity'", "'minmax'")),
    ("trace-kind-choice", {"fleet.groups.0.trace": {"kind": "sine"}}, "fleet.groups.0.trace.kind", ("'replay'",)),
    ("partition-kind", {"data.partition.kind": "random"}, "data.partition.kind", ("'dirichlet'", "'shards'")),
    # structure and cross-field checks
    ("unknown-device-profile", {"fleet.groups.1.profile": "toaster"}, "fleet.groups.1.profile",
     ("'toaster'", "rpi4", "fleet.profiles")),
    ("unknown-server-profile", {"fleet.server_profile": "toaster"}, "fleet.server_profile", ("'toaster'",)),
    ("replay-without-path", {"fleet.groups.0.trace": {"kind": "replay"}}, "fleet.groups.0.trace.path", ("replay",)),
    ("min-speed-above-max", {"fleet.groups.0.trace": {"min_speed": 3, "max_speed": 2}},
     "fleet.groups.0.trace.min_speed", ("max_speed",)),
    ("missing-fleet", {"fleet": DELETE}, "fleet", ("required",)),
    ("empty-groups", {"fleet.groups": []}, "fleet.groups", ("at least 1",)),
    ("group-without-profile", {"fleet.groups.0": {"count": 2}}, "fleet.groups.0.profile", ("required",)),
    ("bad-model-name", {"model.name": "vgg19"}, "model.name", ("'vgg19'", "resnet20", "torchvision:<name>")),
    ("empty-torchvision-name", {"model.name": "torchvision:"}, "model.name", ()),
    ("npz-without-path", {"data.name": "mnist", "data.source": "npz"}, "data.path", ("npz",)),
    ("digits-from-npz", {"data.source": "npz", "data.path": "x.npz"}, "data.source", ("sklearn",)),
    ("unknown-method", {"method.name": "fedsgd"}, "method.name", ("fedavg",)),
    ("fedprox-negative-mu", {"method": {"name": "fedprox", "mu": -1}}, "method.mu", ()),
]


@pytest.mark.parametrize(("patch", "field", "also"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_config_is_one_line_naming_the_field(
    tmp_path: Path, patch: dict[str, Any], field: str, also: tuple[str, ...]
) -> None:
    msg = one_line_error(write(tmp_path, patched(patch)))
    assert msg.startswith(f"config error: {field}: "), msg
    for needle in also:
        assert needle in msg, (needle, msg)


def test_malformed_table_is_large_enough() -> None:
    assert len(MALFORMED) >= 30 and len({c[0] for c in MALFORMED}) == len(MALFORMED)


# file-level problems name the file
FILE_LEVEL: list[tuple[str, bytes | None, tuple[str, ...]]] = [
    ("list-not-mapping", b"- name: x\n- fleet: 1\n", ("mapping",)),
    ("scalar-not-mapping", b"just a string\n", ("mapping",)),
    ("invalid-yaml-syntax", b"name: x\nfleet: {groups: [\n", ("not valid YAML", "line")),
    ("tab-indent", b"name: x\n\tfleet: 1\n", ("not valid YAML", "line 2")),
    ("undefined-alias", b"name: *nope\n", ("not valid YAML",)),
    ("python-tag", b"name: !!python/object:os.system x\n", ("not valid YAML",)),
    ("control-character", b"name: a\x07b\nfleet: {groups: [{profile: rpi4}]}\n", ("not valid YAML",)),
    ("not-utf8", b"\x80\x81\xfe\xff binary", ("not valid YAML",)),
    ("missing-file", None, ("not found",)),
]


@pytest.mark.parametrize(("content", "also"), [c[1:] for c in FILE_LEVEL], ids=[c[0] for c in FILE_LEVEL])
def test_file_level_errors_name_the_file(tmp_path: Path, content: bytes | None, also: tuple[str, ...]) -> None:
    p = tmp_path / "broken-job.yaml"
    if content is not None:
        p.write_bytes(content)
    msg = one_line_error(p)
    assert str(p) in msg
    for needle in also:
        assert needle in msg, (needle, msg)


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    assert "not found" in one_line_error(tmp_path)


def test_empty_file_reports_missing_fleet(tmp_path: Path) -> None:
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert one_line_error(p).startswith("config error: fleet: ")
