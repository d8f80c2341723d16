"""Typed job configuration: YAML in, frozen pydantic models out, errors as one line.

Every section is validated here, at the edge, so a typo fails before Ray starts and before
any training is done. This module is pure schema and imports nothing of flexray's but its
errors: method-specific options (the method's own ``Config`` class) and the names of methods
and device classes are checked by ``flexray.runtime.assembly.load_config``, still before training.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flexray.errors import FlexrayError

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
BUILTIN_MODELS = ("cnn", "lenet", "resnet8", "resnet20", "resnet56", "preresnet18", "vgg", "vit", "darknet19")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartitionConfig(_Frozen):
    kind: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; smaller = more skewed")
    shards_per_device: int = Field(2, ge=1, description="label shards per device (kind=shards)")


class DataConfig(_Frozen):
    name: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100"] = "digits"
    source: Literal["auto", "sklearn", "npz", "torchvision"] = "auto"
    path: str | None = Field(None, description="an .npz with x_train, y_train, x_test, y_test (source=npz)")
    root: str | None = Field(
        None, description="dataset folder (default $FLEXRAY_DATA_ROOT, else ~/.flexray/data): torchvision's files, "
        "or NAME.npz, which is used instead when present")
    download: bool = Field(True, description="let torchvision download the dataset into data.root when it is missing")
    partition: PartitionConfig = PartitionConfig()
    samples_per_device: int | None = Field(None, ge=1, description="cap each device's shard")
    test_samples: int | None = Field(None, ge=1, description="evaluate on the first N test samples")


class ModelConfig(_Frozen):
    name: str = Field("cnn", description="built-in name or torchvision:<name>")
    width: int = Field(32, ge=1, description="base channel count of cnn, vgg and darknet19; vit: token width")
    depth: int = Field(6, ge=1, description="vit: transformer encoder blocks")
    stage_heads: bool = Field(
        False, description="resnet8/20/56: one classifier per narrower stage for depth prefixes (experimental: diverged)"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v in BUILTIN_MODELS or (v.startswith("torchvision:") and len(v) > 12):
            return v
        raise ValueError(f"unknown model {v!r}; use one of {', '.join(BUILTIN_MODELS)} or torchvision:<name>")

    @model_validator(mode="after")
    def _stage_heads_need_stages(self) -> ModelConfig:
        if self.stage_heads and self.name not in ("resnet8", "resnet20", "resnet56"):
            raise ValueError(f"stage_heads: only resnet8/20/56 have per-stage classifiers, not {self.name}; remove it")
        return self


class KindRatesConfig(_Frozen):
    """How fast a device runs one kind of kernel (``flexray.protocol.KindRates``; docs/latency.md)."""

    flops_per_s: float = Field(math.inf, gt=0, description="FLOP/s on this kind's executed FLOPs (.inf: not limiting)")
    bytes_per_s: float = Field(math.inf, gt=0, description="bytes/s read + written by its kernels (.inf: not limiting)")
    kernel_s: float = Field(0.0, ge=0, description="fixed seconds per kernel (dispatch, launch)")
    row_s: float = Field(0.0, ge=0, description="seconds per image plane / token row a kernel loops over")


class LatencyConfig(_Frozen):
    """A calibrated per-layer latency model, as ``flexray probe`` prints it."""

    step_s: float = Field(0.0, ge=0, description="fixed seconds per optimizer step")
    conv: KindRatesConfig = KindRatesConfig()
    grouped: KindRatesConfig = KindRatesConfig()
    matmul: KindRatesConfig = KindRatesConfig()
    attention: KindRatesConfig = KindRatesConfig()
    pool: KindRatesConfig = KindRatesConfig()
    norm: KindRatesConfig = KindRatesConfig()
    memory: KindRatesConfig = KindRatesConfig()


class ProfileConfig(_Frozen):
    """A custom device class; same fields as ``flexray.fleet.profiles.DeviceProfile``. With
    ``flops`` only it is the coarse model; ``latency`` (from ``flexray probe``) the per-layer one."""

    flops: float = Field(gt=0, description="sustained training FLOP/s")
    memory_bytes: float = Field(gt=0)
    uplink_bps: float = Field(gt=0)
    downlink_bps: float = Field(gt=0)
    power_active_w: float = Field(gt=0)
    power_idle_w: float = Field(ge=0)
    power_radio_w: float = Field(ge=0)
    latency: LatencyConfig | None = Field(None, description="calibrated per-layer latency model (flexray probe prints it)")
    rtt_s: float = Field(0.0, ge=0, description="round-trip time each message pays before its bytes flow")


class TraceConfig(_Frozen):
    """Speed multiplier and availability over simulated time."""

    kind: Literal["constant", "periodic", "random_walk", "replay"] = "constant"
    speed: float = Field(1.0, gt=0, description="base speed multiplier")
    amplitude: float = Field(0.0, ge=0, description="periodic: relative swing of speed")
    period_s: float = Field(3600.0, gt=0, description="periodic: period in simulated seconds")
    duty: float = Field(1.0, gt=0, le=1, description="periodic: available fraction of each period")
    sigma: float = Field(0.1, ge=0, description="random_walk: std of the log-speed step")
    step_s: float = Field(60.0, gt=0, description="random_walk: simulated seconds per step")
    min_speed: float = Field(0.05, gt=0)
    max_speed: float = Field(4.0, gt=0)
    p_offline: float = Field(0.0, ge=0, le=1, description="random_walk: chance a step is offline")
    path: str | None = Field(None, description="replay: CSV/Parquet with time_s, speed[, available]")


class DeviceGroup(_Frozen):
    profile: str = Field(description="catalog name (flexray devices) or a key of fleet.profiles")
    count: int = Field(1, ge=1)
    trace: TraceConfig = TraceConfig()
    resources: dict[str, float] = Field(
        default_factory=dict, description='pin to a real device, e.g. {"device:rpi4": 1}'
    )
    node_labels: dict[str, str] = Field(
        default_factory=dict,
        description='pin to nodes started with these labels (Ray label selector), e.g. {"flexray.io/device": "rpi4"}',
    )


class FleetConfig(_Frozen):
    groups: list[DeviceGroup] = Field(min_length=1)
    profiles: dict[str, ProfileConfig] = Field(default_factory=dict)
    actors: int = Field(2, ge=1, description="actors hosting the simulated (unpinned) devices")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    throttle: Literal["virtual", "sleep", "none"] = "virtual"
    time_scale: float = Field(1.0, gt=0, description="sleep mode: wall seconds per simulated second")
    server_profile: str = "edge_gpu_server"
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPU share each device actor asks Ray for (fractional)")
    compute_device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA where the actor got a GPU")
    batch_clients: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto", description="devices trained stacked: auto (CUDA on, CPU off) or a chunk size (1 = one by one)")

    @model_validator(mode="after")
    def _cuda_needs_a_share(self) -> FleetConfig:
        if self.compute_device == "cuda" and not self.num_gpus_per_actor:
            raise ValueError("compute_device: cuda needs a GPU share per actor; set fleet.num_gpus_per_actor (e.g. 0.25)")
        return self


class MethodConfig(BaseModel):
    """Common local-training knobs. Extra keys go to the method's own Config."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "fedavg"
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)

    def held_out(self, n_train: int) -> int:
        """Training samples the server keeps from the devices (a proxy set); the fleet is
        partitioned from the rest. 0 for methods that use no server data."""
        return 0


def sample_count(value: int | float, n: int, field: str) -> int:
    """A count given as an int, or as a fraction (float in (0, 1)) of ``n`` samples (at least 1)."""
    if isinstance(value, float):
        if not 0 < value < 1:
            raise ValueError(f"{field}: a fraction of the training set must be in (0, 1), got {value}; "
                             "write a count as an integer")
        return max(1, round(value * n))
    return int(value)


def _count_or_fraction(value: int | float) -> int | float:
    sample_count(value, 1, "proxy_samples")  # a float must be a fraction
    return value


SampleCount = Annotated[int | float, AfterValidator(_count_or_fraction)]
"""A config field read by ``sample_count``: a count, or a fraction (float in (0, 1)) of the training set."""


def fractions(values: list[float], what: str) -> list[float]:
    """A validated menu of rates in [0, 1) (dropout, pruning): sorted, without repeats."""
    bad = [r for r in values if not 0 <= r < 1]
    if bad:
        raise ValueError(f"{what} must be in [0, 1), got {bad[0]}")
    return sorted({float(r) for r in values})


class RoundsConfig(_Frozen):
    num: int = Field(10, ge=1, description="sync: rounds; async: server model versions")
    mode: Literal["sync", "async"] = "sync"
    clients_per_round: int | None = Field(None, ge=1, description="sample this many devices")
    fraction: float = Field(1.0, gt=0, le=1, description="or this fraction of available devices")
    deadline_s: float | None = Field(None, gt=0, description="simulated seconds; null = none")
    stragglers: Literal["drop", "wait"] = "wait"
    overcommit: float = Field(1.0, ge=1, description="sync: sample this many times more, keep the first")
    concurrency: int | None = Field(None, ge=1, description="async: devices training at once (default: all)")
    idle_step_s: float = Field(60.0, gt=0, description="clock step while no device is available")
    eval_every: int = Field(1, ge=1)
    # async: how an arriving update changes the model, for any method (flexray/methods/policy.py)
    async_policy: Literal["fedasync", "fedbuff"] = Field(
        "fedasync", description="async: fedasync mixes each arrival in; fedbuff steps once per buffer_size arrivals")
    alpha: float = Field(0.6, gt=0, le=1, description="fedasync: mixing weight of a fresh update")
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        "polynomial", description="async: how a stale update is down-weighted, s(t)")
    staleness_a: float = Field(0.5, ge=0, description="polynomial exponent / hinge slope of s(t)")
    staleness_b: int = Field(4, ge=0, description="hinge: staleness tolerated at full weight")
    buffer_size: int = Field(10, ge=1, description="fedbuff: arrivals per server step")
    server_lr: float = Field(1.0, gt=0, description="fedbuff: server step size")
    max_staleness: int | None = Field(None, ge=0, description="async: discard staler updates; null = keep all")


class FaultsConfig(_Frozen):
    """Injected faults, for testing that a deployment survives them (empty = none)."""

    nan_updates: list[tuple[int, int]] = Field(default_factory=list, description="[round, device] pairs")
    bad_shape_updates: list[tuple[int, int]] = Field(default_factory=list, description="[round, device] pairs")


class ScheduleConfig(_Frozen):
    """How methods with a sub-model knob (depth k, width p) pick each device's sub-model."""

    mode: Literal["capacity", "minmax", "static"] = Field(
        "capacity",
        description="capacity: the largest sub-model each device finishes within the fastest device's full-model "
        "time (or rounds.deadline_s), re-planned every round from the traces; minmax: strict min-max latency "
        "(starves the full model on an unequal fleet); static: capability tiers (the papers)",
    )
    slack: float = Field(
        1.0, ge=1.0, description="capacity/minmax: devices may take up to slack x the round time for a larger sub-model"
    )


class TrackingConfig(_Frozen):
    uri: str | None = Field(None, description="MLflow URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = "flexray"
    run_name: str | None = None
    checkpoint_every: int = Field(5, ge=0, description="rounds between checkpoints; 0 = off")
    log_model: bool = True
    plots: bool = True
    gantt_rounds: int = Field(3, ge=1)
    progress: bool = True
    offline_grace_s: float = Field(60.0, ge=0, description="at the end, wait this long for an unreachable MLflow")


class ClusterConfig(_Frozen):
    address: str | None = Field(None, description="Ray address; default $RAY_ADDRESS or a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray")
    rejoin_timeout_s: float = Field(
        300.0, ge=0, description="when no device can train because their nodes left: wait this long for one to rejoin")


class JobConfig(_Frozen):
    name: str = "flexray"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    fleet: FleetConfig
    method: MethodConfig = MethodConfig()
    rounds: RoundsConfig = RoundsConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()
    faults: FaultsConfig = FaultsConfig()


# ---------------------------------------------------------------- loading and errors


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for 'allowed fields' hints)."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int) or cur is None:
            continue
        field = cur.model_fields.get(part) if isinstance(cur, type) and issubclass(cur, BaseModel) else None
        if field is None:
            return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        nxt = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        cur = nxt
    return cur


def format_validation_error(err: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    """One line naming the first bad field and what is allowed."""
    e = err.errors()[0]
    loc = tuple(e["loc"])
    field = prefix + ".".join(str(p) for p in loc) if loc else prefix.rstrip(".") or "config"
    if e["type"] == "extra_forbidden":
        owner = _model_at(root, loc[:-1])
        allowed = ", ".join(owner.model_fields) if owner else "see docs"
        return f"config error: {field}: unknown field; allowed here: {allowed}"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
    return f"config error: {field}: {msg}{shown}"


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(cur, list):
            if not key.isdigit() or int(key) >= len(cur):
                raise FlexrayError(f"--set {dotted}: {'.'.join(keys[:i])} is a list; use an index < {len(cur)}")
            key = int(key)  # type: ignore[assignment]
        elif not isinstance(cur, dict):
            raise FlexrayError(f"--set {dotted}: {'.'.join(keys[:i])} is not a section")
        if last:
            cur[key] = value
        else:
            if isinstance(cur, dict) and key not in cur:
                cur[key] = {}
            cur = cur[key]


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise FlexrayError(f"--set {item!r}: expected key.path=value, e.g. --set rounds.num=5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key.strip(), value)
    return tree


def parse_schema(tree: dict[str, Any]) -> JobConfig:
    """Validate a config tree (already overridden) against the schema, or raise FlexrayError.

    Schema only: the method's own options and the names of methods and device classes are
    resolved a layer up (``flexray.runtime.assembly.parse_config``)."""
    if not isinstance(tree, dict):
        raise FlexrayError("config error: the file must hold a YAML mapping (key: value)")
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise FlexrayError(format_validation_error(err, JobConfig)) from None


def read_tree(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML mapping in ``path`` with ``--set`` overrides applied, or a one-line FlexrayError."""
    p = Path(path)
    if not p.is_file():
        raise FlexrayError(f"config file not found: {p} (give the path to a job YAML, e.g. jobs/quickstart.yaml)")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())  # one line, always
        raise FlexrayError(f"config error: {p} is not valid YAML{where}: {problem}") from None
    except OSError as err:
        raise FlexrayError(f"config error: cannot read {p}: {err.strerror or err}") from None
    if not isinstance(tree, dict):
        raise FlexrayError(f"config error: {p} must hold a YAML mapping (key: value)")
    return apply_overrides(tree, overrides or [])


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts/lists into dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix.rstrip("."): tree}
    for k, v in items:
        if isinstance(v, (dict, list)) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
