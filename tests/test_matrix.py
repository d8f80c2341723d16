"""The method x model x mode matrix: every cell either trains one tiny round through the shared Ray
cluster and a real MLflow store, or ``flexray plan`` refuses it with one line naming a config field.

A cell that fails after Ray has started is a bug. The default run (CI) takes a cross-section that
docs/matrix.md predicts: for every method and mode one cell that trains, rotating over the models,
and one cell per distinct refusal; each must do what the page says. The other cells are marked
``slow``: ``pytest -m "slow or not slow" tests/test_matrix.py`` runs all 308 (about half an hour)
and its last test renders the page from them (``FLEXRAY_WRITE_MATRIX=1`` rewrites it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flexray import cli
from flexray.runtime.assembly import load_config
from flexray.methods import _PATHS
from flexray.runtime import session
from flexray.runtime.actor import warm_actors

pytestmark = [pytest.mark.usefixtures("warm_ray_actors"), pytest.mark.ray]


REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "matrix.md"
METHODS = list(_PATHS)
MODELS = ["cnn", "lenet", "vgg", "resnet8", "resnet20", "preresnet18", "darknet19", "torchvision:resnet18",
          "torchvision:mobilenet_v2", "torchvision:vgg11_bn", "torchvision:efficientnet_b0"]
# Models that down-sample 8x8 digits to nothing train on 32x32 images (the CIFAR-100 subset in the repo's data).
LARGE_INPUT = {"torchvision:vgg11_bn", "torchvision:efficientnet_b0"}
SHARED_DATA = REPO.parent / "shared" / "data"
MODES = ("sync", "async")
CELLS = [(method, model, mode) for method in METHODS for model in MODELS for mode in MODES]


def page_outcomes() -> dict[tuple[str, str, str], str]:
    """What docs/matrix.md says of each cell: "run", or the refusal line of its footnote."""
    if not PAGE.exists():
        return {}
    text = PAGE.read_text()
    notes = dict(re.findall(r"^(\d+)\. `(.+)`$", text, re.M))
    out: dict[tuple[str, str, str], str] = {}
    for method, row in re.findall(r"^\| `([a-z_]+)` \| (.+) \|$", text, re.M):
        for model, cell in zip(MODELS, row.split(" | ")):
            for mode, (tick, note) in zip(MODES, re.findall(r"(✓)|–<sup>(\d+)</sup>", cell)):
                out[(method, model, mode)] = "run" if tick else notes.get(note, "?")
    return out


def cross_section(expected: dict[tuple[str, str, str], str]) -> set[tuple[str, str, str]]:
    """Per method and mode, the first cell that trains from a model that rotates with the method,
    and the first cell of every distinct refusal: about 35 cells, every model but the two large
    ones among them (a 32x32 torchvision VGG-11-BN round alone takes 1-2 minutes here)."""
    chosen: set[tuple[str, str, str]] = set()
    small = [m for m in MODELS if m not in LARGE_INPUT]
    for i, method in enumerate(METHODS):
        for j, mode in enumerate(MODES):
            start = 2 * i + j
            order = [small[(start + k) % len(small)] for k in range(len(small))]
            cell = next(((method, m, mode) for m in order if expected.get((method, m, mode)) == "run"), None)
            chosen.add(cell or (method, order[0], mode))
    seen: set[str] = set()
    for cell in CELLS:
        if cell[1] in small and expected.get(cell, "run") != "run" and expected[cell] not in seen:
            seen.add(expected[cell])
            chosen.add(cell)
    return chosen


EXPECTED = page_outcomes()
QUICK = cross_section(EXPECTED)

# (method, model, mode) -> "run" or the refusal line (without the "flexray: error: " prefix)
OUTCOMES: dict[tuple[str, str, str], str] = {}
TIMES: dict[tuple[str, str, str], float] = {}

REFUSAL = re.compile(r"^flexray: error: config error: (?P<field>[a-z_]+(\.[a-z_0-9]+)+): .+; use .+$")


def job_yaml(tmp_path: Path, method: str, model: str, mode: str, mlflow_uri: str, dse_cache: Path) -> Path:
    """The smallest job that still is one real round: 2 devices (a slow and a fast class) of 20
    digits each, one actor, batch 16, 32 test samples."""
    m: dict = {"name": method, "batch_size": 16, "lr": 0.05}
    if method == "distreal":  # a design-space search of 4 candidates, one proxy step each
        m["dse"] = {"grid": [0.0, 0.5], "pop_size": 4, "generations": 1, "proxy_samples": 20, "proxy_steps": 1,
                    "proxy_batch": 8, "cache_dir": str(dse_cache)}
    if method == "fedbuff":  # one server step per 2 arrivals, not the default 10
        m["buffer_size"] = 2
    if method == "reft":
        m.update(proxy_samples=16, distill_steps=1, distill_batch=16)
    tree = {
        "name": f"matrix-{method}-{model}-{mode}",
        "seed": 0,
        "data": ({"name": "cifar100", "source": "npz", "path": str(SHARED_DATA / "cifar100_subset.npz"),
                  "samples_per_device": 20, "test_samples": 32} if model in LARGE_INPUT
                 else {"name": "digits", "samples_per_device": 20, "test_samples": 32}),
        "model": {"name": model, "width": 8},
        "fleet": {"actors": 1, "groups": [{"profile": "rpi3", "count": 1}, {"profile": "laptop_cpu", "count": 1}]},
        "method": m,
        "rounds": {"num": 1, "mode": mode},
        "tracking": {"uri": mlflow_uri, "experiment": "matrix", "progress": False, "plots": False,
                     "log_model": False, "checkpoint_every": 0},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@contextlib.contextmanager
def flexray_logger_kept() -> Iterator[None]:
    """``cli.main`` adds a handler to the ``flexray`` logger on each call (bound to this test's
    captured stderr): drop it afterwards so later tests do not write into a closed capture."""
    logger = logging.getLogger("flexray")
    before = list(logger.handlers)
    try:
        yield
    finally:
        logger.handlers[:] = before


def cli_main(argv: list[str]) -> int:
    with flexray_logger_kept():
        return cli.main(argv)


@pytest.fixture(scope="module")
def dse_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dse")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread: None) -> None:
    """On a busy 2-core machine two torch threads make ``plan``'s FLOP count 10-20x slower."""


@pytest.fixture(scope="module", autouse=True)
def _warm(ray_cluster) -> Iterator[None]:
    """Every cell hosts the same two devices on one actor: keep that actor warm from cell to cell
    (importing torch in a new actor is most of a one-round job), killed after the last cell."""
    with warm_actors():
        yield


def assert_one_line_refusal(rc: int, out: str, err: str, what: str) -> str:
    lines = err.splitlines()
    assert rc != 0, f"{what} exited 0 but printed {err!r}"
    assert "Traceback" not in out + err, f"{what} printed a traceback:\n{err}"
    assert len(lines) == 1, f"{what} must refuse in exactly one stderr line, got:\n{err}"
    assert REFUSAL.match(lines[0]), f"{what}: not a one-line config error naming a field: {lines[0]!r}"
    return lines[0].removeprefix("flexray: error: ")


def test_refusal_check_fails_on_a_traceback_or_a_vague_line() -> None:
    good = "flexray: error: config error: model.name: needs a plain chain; use cnn\n"
    assert assert_one_line_refusal(2, "", good, "plan") == "config error: model.name: needs a plain chain; use cnn"
    bad = {
        "exit 0": (0, "", good),
        "traceback": (1, "", "Traceback (most recent call last):\n  ...\nValueError: x\n" + good),
        "two lines": (2, "", good + "flexray: also this\n"),
        "no field": (2, "", "flexray: error: something went wrong\n"),
        "no fix": (2, "", "flexray: error: config error: model.name: unsupported\n"),
    }
    for what, (rc, out, err) in bad.items():
        with pytest.raises(AssertionError):
            assert_one_line_refusal(rc, out, err, what)


@pytest.mark.parametrize(("method", "model", "mode"), [
    pytest.param(*cell, id="-".join(cell), marks=() if cell in QUICK else pytest.mark.slow) for cell in CELLS])
def test_cell(method: str, model: str, mode: str, ray_cluster, mlflow_uri: str, dse_cache: Path,
              tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = time.perf_counter()
    path = job_yaml(tmp_path, method, model, mode, mlflow_uri, dse_cache)
    capsys.readouterr()
    rc = cli_main(["plan", str(path)])
    out, err = capsys.readouterr()
    if rc != 0:
        line = assert_one_line_refusal(rc, out, err, "flexray plan")
        # `flexray run` refuses the same cell with the same line, and before Ray is touched.
        def no_ray(cfg: object) -> None:
            raise AssertionError(f"flexray run started Ray for a cell plan refuses: {line}")

        monkeypatch.setattr(session, "ray_session", no_ray)
        rc_run = cli_main(["run", str(path)])
        out_run, err_run = capsys.readouterr()
        assert assert_one_line_refusal(rc_run, out_run, err_run, "flexray run") == line
        expect_as_the_page_says(method, model, mode, line)
        OUTCOMES[(method, model, mode)] = line
        TIMES[(method, model, mode)] = time.perf_counter() - t0
        return
    assert "Traceback" not in out + err, err
    expect_as_the_page_says(method, model, mode, "run")

    result = session.run_job(load_config(path))
    assert len(result.history) == 1, result.history
    final = result.metrics
    assert final is not None
    bad = {k: v for k, v in final.as_dict().items() if not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    assert 0.0 <= final.accuracy <= 1.0 and final.loss >= 0.0 and final.sim_time_s > 0.0, final
    assert final.participants >= 1, final
    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == method and run.data.params["model.name"] == model
    assert run.data.params["rounds.mode"] == mode
    OUTCOMES[(method, model, mode)] = "run"
    TIMES[(method, model, mode)] = time.perf_counter() - t0


def expect_as_the_page_says(method: str, model: str, mode: str, outcome: str) -> None:
    """A cell of the cross-section must do what docs/matrix.md says (the full run rewrites the page)."""
    if (method, model, mode) in QUICK and os.environ.get("FLEXRAY_WRITE_MATRIX") != "1":
        assert EXPECTED.get((method, model, mode)) == outcome, (
            f"docs/matrix.md says {EXPECTED.get((method, model, mode))!r} for this cell, it did {outcome!r}")


def test_the_cross_section_covers_every_method_mode_and_model() -> None:
    assert EXPECTED, "docs/matrix.md is missing"
    assert len(EXPECTED) == len(CELLS) and set(EXPECTED.values()) - {"run"}, "docs/matrix.md does not parse"
    trains = {(a, c) for a, b, c in QUICK if EXPECTED[(a, b, c)] == "run"}
    assert trains == {(a, c) for a, b, c in CELLS if EXPECTED[(a, b, c)] == "run"}  # every method and mode that can
    assert {b for _, b, _ in QUICK} == set(MODELS) - LARGE_INPUT
    refusals = {EXPECTED[c] for c in CELLS if c[1] not in LARGE_INPUT} - {"run"}
    assert refusals == {EXPECTED[c] for c in QUICK} - {"run"}  # every refusal


# ---- the page


def render(outcomes: dict[tuple[str, str, str], str]) -> str:
    """docs/matrix.md from the cells' outcomes: ✓ trains one round, – refused (reason in a footnote)."""
    notes: list[str] = []  # distinct refusal reasons, numbered in order of first appearance

    def mark(cell: tuple[str, str, str]) -> str:
        outcome = outcomes[cell]
        if outcome == "run":
            return "✓"
        if outcome not in notes:
            notes.append(outcome)
        return f"–<sup>{notes.index(outcome) + 1}</sup>"

    def count(mode: str) -> int:
        return sum(outcomes[(a, b, c)] == "run" for a, b, c in CELLS if c == mode)

    refused = sum(v != "run" for v in outcomes.values())
    sync, asyn = count("sync"), count("async")
    lines = [
        "# Method × model × mode matrix",
        "",
        "<!-- generated by tests/test_matrix.py (FLEXRAY_WRITE_MATRIX=1 rewrites it); do not edit -->",
        "",
        f"{len(CELLS)} cells ({len(METHODS)} methods × {len(MODELS)} models × sync/async): "
        f"**{sync}** train in sync rounds, **{asyn}** in async rounds, **{refused}** are refused by "
        "`flexray plan` (and `flexray run`) with one line naming the field, before Ray starts.",
        "",
        "Each cell is `sync/async`: ✓ is one round of a tiny digits job (2 devices, one actor; "
        + ", ".join(f"`{m}`" for m in sorted(LARGE_INPUT)) + " on 32x32 CIFAR-100 images) through a real "
        "Ray cluster into a real MLflow store, finished with finite metrics; – is refused, the number points to "
        "the refusal below. `python -m pytest -m \"slow or not slow\" tests/test_matrix.py` runs every cell and renders "
        "this page; the default test run checks a cross-section of about 30 cells against it.",
        "",
        "| method | " + " | ".join(f"`{m}`" for m in MODELS) + " |",
        "| --- |" + " :---: |" * len(MODELS),
    ]
    for method in METHODS:
        cells = [f"{mark((method, model, 'sync'))}/{mark((method, model, 'async'))}" for model in MODELS]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    per_model = [f"`{m}` {sum(outcomes[(a, m, c)] == 'run' for a in METHODS for c in MODES)}" for m in MODELS]
    lines += ["", "Cells that train, per model (sync + async): " + ", ".join(per_model) + ".", "", "Refusals:", ""]
    lines += [f"{i}. `{note}`" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def test_matrix_page() -> None:
    """Ordered last: renders docs/matrix.md from the cells above and checks the page is current."""
    if len(OUTCOMES) < len(CELLS):
        pytest.skip(f"only {len(OUTCOMES)} of {len(CELLS)} cells ran (a selection, or a cell failed)")
    slow = sorted(TIMES.items(), key=lambda kv: -kv[1])[:5]
    print(f"\nmatrix: {sum(TIMES.values()):.0f} s over {len(TIMES)} cells; slowest: "
          + ", ".join(f"{'-'.join(k)} {v:.1f} s" for k, v in slow))
    page = render(OUTCOMES)
    if os.environ.get("FLEXRAY_WRITE_MATRIX") == "1":
        PAGE.write_text(page)
        return
    assert PAGE.exists() and PAGE.read_text() == page, (
        "docs/matrix.md is stale; rerun with FLEXRAY_WRITE_MATRIX=1 pytest tests/test_matrix.py")
