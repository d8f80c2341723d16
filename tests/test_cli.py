"""``flexray`` CLI: plan, devices, report and error handling, in-process (no Ray) plus two real
subprocess calls of the installed console script."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flexray.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "jobs" / "quickstart.yaml")
FLEXRAY = shutil.which("flexray", path=str(Path(sys.executable).parent)) or shutil.which("flexray")
ROUND_RE = re.compile(r"^predicted round time: (\S+) s simulated \((\d+) of (\d+) devices", re.M)


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the first ``_table`` in ``text`` as dicts, cut at the columns the dash line marks."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line and set(line) <= {"-", " "} and "--" in line)
    spans = [m.span() for m in re.finditer(r"-+", lines[i])]
    header = lines[i - 1]

    def cut(line: str) -> list[str]:
        # right-aligned cells: each cell ends where its dashes end and starts after the previous column
        out, start = [], 0
        for _, end in spans:
            out.append(line[start:end].strip())
            start = end
        return out

    names = cut(header)
    rows = []
    for line in lines[i + 1:]:
        if not line.strip():
            break
        rows.append(dict(zip(names, cut(line))))
    return rows


def one_stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("flexray: error: ") and "Traceback" not in err
    return lines[0]


def run_main(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


_RAY_INITS: list[tuple] = []


@pytest.fixture(autouse=True)
def _count_ray_inits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record ray.init calls (still calling the real one): another test file may already
    hold a Ray session in this process, so is_initialized() alone cannot tell."""
    import ray

    real = ray.init
    _RAY_INITS.clear()

    def spy(*args: object, **kwargs: object) -> object:
        _RAY_INITS.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(ray, "init", spy)


def ray_started() -> bool:
    return bool(_RAY_INITS)


# ---------------------------------------------------------------- parser


def test_parser_accepts_run_with_sets_and_resume() -> None:
    args = build_parser().parse_args(["run", "job.yaml", "--set", "rounds.num=2", "--set", "seed=1", "--resume", "abc"])
    assert args.config == "job.yaml" and args.set == ["rounds.num=2", "seed=1"] and args.resume == "abc"
    plan = build_parser().parse_args(["plan", "job.yaml"])
    assert plan.set == [] and not hasattr(plan, "resume")
    rep = build_parser().parse_args(["report", "r1", "--uri", "sqlite:///x.db"])
    assert (rep.run_id, rep.uri) == ("r1", "sqlite:///x.db")


@pytest.mark.parametrize("argv", [[], ["report"], ["plan"], ["frobnicate"], ["plan", "--resume", "x", "job.yaml"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: flexray" in capsys.readouterr().err


# ---------------------------------------------------------------- devices


def test_devices_lists_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    from flexray.fleet.profiles import CATALOG

    assert main(["devices"]) == 0
    rows = parse_table(capsys.readouterr().out)
    assert [r["class"] for r in rows] == list(CATALOG)
    rpi4 = next(r for r in rows if r["class"] == "rpi4")
    assert float(rpi4["GFLOP/s"]) == pytest.approx(CATALOG["rpi4"].flops / 1e9, rel=1e-3)
    assert float(rpi4["active_W"]) == pytest.approx(CATALOG["rpi4"].power_active_w, rel=1e-3)
    assert float(rpi4["rtt_ms"]) == pytest.approx(CATALOG["rpi4"].rtt_s * 1e3, rel=1e-3)
    assert all(float(r["GFLOP/s"]) > 0 and float(r["mem_GiB"]) > 0 for r in rows)


def test_devices_subprocess() -> None:
    assert FLEXRAY, "console script flexray not installed"
    proc = subprocess.run([FLEXRAY, "devices"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = parse_table(proc.stdout)
    names = [r["class"] for r in rows]
    assert len(names) >= 8 and len(set(names)) == len(names)
    assert {"rpi3", "rpi4", "jetson_nano", "phone_mid", "laptop_cpu", "edge_gpu_server"} <= set(names)


# ---------------------------------------------------------------- errors: one line, exit 2


def test_malformed_config_subprocess(tmp_path: Path) -> None:
    assert FLEXRAY, "console script flexray not installed"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nfleet: {groups: [{profile: rpi4}]}\nrounds: {stragglers: ignore}\n")
    proc = subprocess.run([FLEXRAY, "run", str(bad)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("flexray: error: ")
    assert "rounds.stragglers" in lines[0] and "'drop'" in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "mlflow.db").exists()  # failed before tracking started


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize(("yaml_text", "sets", "needle"), [
    ("name: x\nfleet: {groups: [{profile: toaster}]}\n", [], "fleet.groups.0.profile"),
    ("name: x\nfleet: {groups: [{profile: rpi4}]}\n", ["fleet.groups.0.count=0"], "fleet.groups.0.count"),
    ("name: x\nfleet: {groups: [{profile: rpi4}]}\n", ["rounds.num"], "--set"),
    ("name: x\nfleet: {groups: [{profile: rpi4}]}\nmodel: {nme: cnn}\n", [], "model.nme"),
    (None, [], "not found"),
    ("name: x\nfleet: {groups: [{profile: rpi4}]}\n", ["method.name=flextrain"], "residual"),
    ("name: x\nfleet: {groups: [{profile: rpi4}]}\nmodel: {name: resnet8}\n", ["method.name=flextrain", "method.k=5"],
     "method.k"),
    ("name: x\nfleet: {groups: [{profile: rpi4}]}\n",
     ["method.name=splitfed", "model.name=torchvision:regnet_x_400mf"], "model.name: splitfed cuts between"),
], ids=["unknown-profile", "set-invalid-value", "set-without-equals", "unknown-model-key", "missing-file",
        "flextrain-on-a-plain-cnn", "flextrain-k-beyond-the-blocks", "splitfed-on-a-one-stage-model"])
def test_bad_config_one_line_exit_2(
    command: str, yaml_text: str | None, sets: list[str], needle: str,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tmp_path / "job.yaml"
    if yaml_text is not None:
        cfg.write_text(yaml_text)
    argv = [command, str(cfg), *(a for s in sets for a in ("--set", s))]
    assert main(argv) == 2
    line = one_stderr_line(capsys)
    assert needle in line
    assert not ray_started()


# ---------------------------------------------------------------- plan


@pytest.fixture(scope="module")
def quickstart_plan() -> tuple[list[dict[str, str]], float, str]:
    rc, out = run_main(["plan", QUICKSTART])
    assert rc == 0
    m = ROUND_RE.search(out)
    assert m, out
    return parse_table(out), float(m.group(1)), out


def test_plan_prints_one_row_per_device(quickstart_plan: tuple[list[dict[str, str]], float, str]) -> None:
    rows, _, out = quickstart_plan
    assert len(rows) == 8
    assert len({r["device"] for r in rows}) == 8
    assert sorted(r["device"].rsplit("-", 1)[0] for r in rows) == sorted(
        ["rpi4"] * 2 + ["jetson_nano"] * 2 + ["phone_mid"] * 2 + ["laptop_cpu"] * 2)
    for r in rows:
        parts = [float(r[k]) for k in ("down_s", "compute_s", "up_s")]
        assert all(p > 0 for p in parts)
        assert float(r["total_s"]) == pytest.approx(sum(parts), rel=2e-3)
        assert float(r["energy_j"]) > 0 and int(r["samples"]) > 0 and float(r["flops"]) > 0
        assert r["fits_mem"] == "yes"
    assert "(8 of 8 devices available at t=0)" in out
    assert not ray_started()


def test_plan_round_time_is_the_slowest_device(quickstart_plan: tuple[list[dict[str, str]], float, str]) -> None:
    rows, round_s, _ = quickstart_plan
    slowest = max(float(r["total_s"]) for r in rows)
    assert round_s > 0
    assert round_s == pytest.approx(slowest, rel=1e-3)


def test_plan_slower_devices_take_longer(quickstart_plan: tuple[list[dict[str, str]], float, str]) -> None:
    rows, _, _ = quickstart_plan
    compute = {r["device"].rsplit("-", 1)[0]: float(r["compute_s"]) / int(r["samples"]) for r in rows}
    assert compute["rpi4"] > compute["jetson_nano"] > compute["laptop_cpu"]


def test_plan_reports_the_deadline_when_stragglers_drop(
    quickstart_plan: tuple[list[dict[str, str]], float, str],
) -> None:
    rows, slowest, _ = quickstart_plan
    deadline = float(f"{slowest / 2:.3g}")
    sets = ["--set", f"rounds.deadline_s={deadline}"]
    rc, out = run_main(["plan", QUICKSTART, *sets, "--set", "rounds.stragglers=drop"])
    assert rc == 0
    assert float(ROUND_RE.search(out).group(1)) == pytest.approx(deadline, rel=1e-3)
    assert len(parse_table(out)) == len(rows)  # the table still predicts every device
    # waiting for stragglers ignores the deadline
    rc, out = run_main(["plan", QUICKSTART, *sets, "--set", "rounds.stragglers=wait"])
    assert rc == 0
    assert float(ROUND_RE.search(out).group(1)) == pytest.approx(slowest, rel=1e-3)


def test_plan_set_changes_the_fleet() -> None:
    rc, out = run_main(["plan", QUICKSTART, "--set", "fleet.groups=[{profile: rpi3, count: 3}]"])
    assert rc == 0
    rows = parse_table(out)
    assert [r["device"] for r in rows] == ["rpi3-0", "rpi3-1", "rpi3-2"]
    assert "(3 of 3 devices" in out


# ---------------------------------------------------------------- report

ACC = [0.5, 0.625, 0.75]
SIM = [10.5, 21.25, 32.0]


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow-cli")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("cli-test", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(exp)
    rid = run.info.run_id
    client.log_param(rid, "name", "report-job")
    client.log_param(rid, "method.name", "fedprox")
    for step, (acc, sim) in enumerate(zip(ACC, SIM), start=1):
        client.log_metric(rid, "accuracy", acc, step=step)
        client.log_metric(rid, "sim_time_s", sim, step=step)
    client.set_terminated(rid)
    return uri, rid


def check_report(out: str, rid: str) -> None:
    head = out.splitlines()[0]
    assert rid in head and "FINISHED" in head
    assert "job=report-job" in head and "method=fedprox" in head
    rows = parse_table(out)
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert [float(r["accuracy"]) for r in rows] == ACC
    assert [float(r["sim_time_s"]) for r in rows] == SIM
    assert all(r["energy_j"] == "" for r in rows)  # not logged -> empty cell


def test_report_prints_rounds(mlflow_run: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    uri, rid = mlflow_run
    assert main(["report", rid, "--uri", uri]) == 0
    captured = capsys.readouterr()
    check_report(captured.out, rid)
    assert captured.err == ""


def test_report_uses_mlflow_tracking_uri_env(
    mlflow_run: tuple[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, rid = mlflow_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["report", rid]) == 0
    check_report(capsys.readouterr().out, rid)


def test_report_unknown_run_exits_2(mlflow_run: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    uri, _ = mlflow_run
    assert main(["report", "0123456789abcdef0123456789abcdef", "--uri", uri]) == 2
    line = one_stderr_line(capsys)
    assert "0123456789abcdef0123456789abcdef" in line and "--uri" in line


@pytest.mark.parametrize("mode", ["capacity", "minmax", "static"])
def test_plan_shows_each_devices_sub_model(mode: str) -> None:
    sets = ["--set", "method.name=flextrain", "--set", "model.name=resnet8", "--set", f"schedule.mode={mode}"]
    rc, out = run_main(["plan", QUICKSTART, *sets])
    assert rc == 0, out
    rows = parse_table(out)
    k = {r["device"].rsplit("-", 1)[0]: int(r["plan"].split("=")[1]) for r in rows}
    assert k["rpi4"] <= k["phone_mid"] <= k["jetson_nano"] <= k["laptop_cpu"] and k["rpi4"] < k["laptop_cpu"]
    total = [float(r["total_s"]) for r in rows]
    slowest_class = max(rows, key=lambda r: float(r["total_s"]))["device"]
    if mode == "capacity":  # the fastest class trains the full model (resnet8: k=3 blocks)
        assert k["laptop_cpu"] == 3
    if mode == "minmax":  # the slowest device runs its smallest prefix; nobody is slower than it
        assert slowest_class.startswith("rpi4") and k["rpi4"] == 1
        assert max(total) == pytest.approx(max(float(r["total_s"]) for r in rows if r["device"].startswith("rpi4")))


@pytest.mark.parametrize("method", ["reft", "distreal"])
def test_plan_says_what_the_server_holds_out(method: str, tmp_path: Path) -> None:
    """The quickstart's defaults hold out a tenth of the training set for the server's proxy set
    (they were refused before: the devices left it nothing); plan says how much."""
    sets = ["--set", f"method.name={method}"]
    if method == "distreal":
        sets += ["--set", f"method.dse.cache_dir={tmp_path}", "--set", "method.dse.generations=1"]
    rc, out = run_main(["plan", QUICKSTART, *sets])
    assert rc == 0, out
    held, total, rest = map(int, re.search(r"held out for the server: (\d+) of (\d+) .* other (\d+)", out).groups())
    assert held == round(0.1 * total) and rest == total - held
    assert sum(int(r["samples"]) for r in parse_table(out)) == rest  # the devices hold the rest


# ---------------------------------------------------------------- every method on models it may not fit


PLAN_MODELS = ["cnn", "resnet20", "torchvision:mobilenet_v2", "torchvision:regnet_x_400mf"]


@pytest.mark.parametrize("model", PLAN_MODELS)
def test_plan_plans_or_refuses_every_method_in_one_line(
    model: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    """Each method on each model either plans or is refused with one line naming the field
    (``config error: FIELD: ...``) and exit 2; never a traceback, and never a started Ray.
    DISTREAL's search is cut to four one-step candidates (its default search on a torchvision
    model takes minutes; its progress and cache are tested in test_distreal.py)."""
    from flexray.methods import METHODS

    for name in METHODS:
        sets = ["--set", f"method.name={name}", "--set", f"model.name={model}"]
        if name in ("fedasync", "fedbuff"):
            sets += ["--set", "rounds.mode=async"]
        if name == "distreal":
            sets += [f"--set=method.dse.{k}" for k in (
                "grid=[0.0,0.5]", "pop_size=4", "generations=1", "proxy_steps=1", f"cache_dir={tmp_path}")]
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["plan", QUICKSTART, *sets])
        err = capsys.readouterr().err
        assert rc in (0, 2), (name, err)
        if rc == 2:
            assert re.fullmatch(r"flexray: error: config error: [a-z_.0-9]+: [^\n]+\n", err), (name, err)
    assert not ray_started()
