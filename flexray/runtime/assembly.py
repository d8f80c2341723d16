"""From YAML to a resolved job config: the config schema plus the names it refers to.

``flexray.config`` is pure schema. The names a config holds (a method, a device class) are
resolved here, a layer above ``flexray.methods`` and ``flexray.fleet``: the method's own
``Config`` class validates its options, unknown options are refused, and the cross-field checks
that need the method registry or the device catalog run -- all before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flexray.config import JobConfig, format_validation_error, parse_schema, read_tree
from flexray.errors import FlexrayError
from flexray.fleet.profiles import CATALOG
from flexray.methods import method_class


def parse_config(tree: dict[str, Any]) -> JobConfig:
    """Validate a config tree (already overridden) into a resolved JobConfig, or raise FlexrayError."""
    cfg = parse_schema(tree)
    cls = method_class(cfg.method.name)
    try:
        method_cfg = cls.Config.model_validate(cfg.method.model_dump())
    except ValidationError as err:
        raise FlexrayError(format_validation_error(err, cls.Config, prefix="method.")) from None
    if method_cfg.model_extra:  # the method's Config inherits extra="allow": reject typos here
        bad = next(iter(method_cfg.model_extra))
        raise FlexrayError(
            f"config error: method.{bad}: unknown option for method {cfg.method.name!r}; "
            f"allowed here: {', '.join(cls.Config.model_fields)}"
        )
    cfg = cfg.model_copy(update={"method": method_cfg})
    _check_cross_fields(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """The job config in the YAML file ``path`` with ``--set`` overrides, resolved."""
    return parse_config(read_tree(path, overrides))


def _check_cross_fields(cfg: JobConfig) -> None:
    for i, g in enumerate(cfg.fleet.groups):
        if g.profile not in CATALOG and g.profile not in cfg.fleet.profiles:
            raise FlexrayError(
                f"config error: fleet.groups.{i}.profile: unknown device class {g.profile!r}; "
                f"use one of {', '.join(CATALOG)} or define it under fleet.profiles"
            )
        if g.trace.kind == "replay" and not g.trace.path:
            raise FlexrayError(f"config error: fleet.groups.{i}.trace.path: required for kind=replay")
        if g.trace.min_speed > g.trace.max_speed:
            raise FlexrayError(f"config error: fleet.groups.{i}.trace.min_speed: must be <= max_speed")
    if cfg.fleet.server_profile not in CATALOG and cfg.fleet.server_profile not in cfg.fleet.profiles:
        raise FlexrayError(f"config error: fleet.server_profile: unknown device class {cfg.fleet.server_profile!r}")
    if cfg.data.source == "npz" and not cfg.data.path:
        raise FlexrayError("config error: data.path: required for source=npz (an .npz with x_train, y_train, x_test, y_test)")
    _check_async(cfg)
    if cfg.rounds.mode == "async" and cfg.rounds.overcommit > 1:
        raise FlexrayError("config error: rounds.overcommit: only for sync rounds (async keeps every device busy)")
    if cfg.data.name == "digits" and cfg.data.source in ("npz", "torchvision"):
        raise FlexrayError("config error: data.source: digits comes from scikit-learn; use source=auto or sklearn")


def _check_async(cfg: JobConfig) -> None:
    """Async rounds are a mode of the rounds engine, so every method that runs on it has them;
    another engine's work (e.g. one update made by all devices together) has none."""
    if cfg.rounds.mode == "async" and method_class(cfg.method.name).engine is not None:
        raise FlexrayError(f"config error: rounds.mode: method {cfg.method.name!r} makes one update from all its "
                           "devices together, so nothing can land asynchronously; use rounds.mode=sync")
