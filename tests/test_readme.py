"""The README's commands, run as a new user would run them: the fenced shell lines of the
quickstart and of "Submitting to a Ray cluster", read from README.md at test time.

Each runs in a temporary copy of the repository with a fresh home folder (a new user: no Ray
token, no MLflow store) and an environment cleared of everything flexray, Ray or MLflow would
read, so only what the README sets is set. The only rewrites are for sharing this machine: the
head gets free ports and a temp dir of its own (and is stopped by that handle, never by
``ray stop``), and the submit address follows the dashboard port. The README's test command is
the one ``.ci/run`` runs; a test here keeps the two equal.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path


from mlflow.tracking import MlflowClient

from .conftest import REPO, free_port, stop_ray_node

README = (REPO / "README.md").read_text()
CLEARED = ("RAY_", "MLFLOW_", "FLEXRAY_", "VIRTUAL_ENV", "PYTHONPATH")


def section(heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher level
    (``#`` lines inside fenced blocks are shell comments, not headings)."""
    lines, out, level, fenced = README.splitlines(), None, 0, False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^(#+) (.*?)\s*$", line)
        if out is None:
            if m and m.group(2) == heading:
                out, level = [], len(m.group(1))
        elif m and len(m.group(1)) <= level:
            break
        else:
            out.append(line)
    assert out is not None, f"README has no heading {heading!r}"
    return "\n".join(out) + "\n"


def bash_lines(text: str) -> list[str]:
    """The command lines of the ```bash blocks in ``text`` (comments and blank lines dropped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return lines


def user_env(home: Path, venv_bin: Path) -> dict[str, str]:
    """The user's shell with the child venv active (its bin/, then this venv's: ``ray``, ``mlflow``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED)}
    path = os.pathsep.join([str(venv_bin), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HOME=str(home), PATH=path, RAY_USAGE_STATS_ENABLED="0")
    return env


def repo_copy(dest: Path) -> Path:
    """What a clone holds: the tracked files (plus uncommitted edits), no build or run leftovers."""
    ignore = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", "mlruns",
                                    "mlartifacts", "mlflow.db", "flexray_runs", "build")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def child_venv(root: Path) -> Path:
    """A new venv that sees this one's packages (so ``pip install -e .`` only installs flexray,
    and into the child, leaving the test environment's own install alone); returns its bin/."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True, timeout=300)
    purelib = sysconfig.get_paths()["purelib"]
    child_lib = next((root / "lib").glob("python*/site-packages"))
    (child_lib / "_parent_env.pth").write_text(purelib + "\n")
    return root / "bin"


def test_readme_test_command_is_what_ci_runs() -> None:
    lines = bash_lines(section("Two commands"))
    test_line = next(ln for ln in lines if "pytest" in ln)
    assert test_line == "pip install -e '.[test]' && python -m pytest -q"
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q -e '.[test]'" in ci and "\npython -m pytest -q\n" in ci
    assert "python3 -m venv" in ci  # a new venv every run


def test_a_new_user_follows_the_readme(tmp_path: Path) -> None:
    """The quickstart line, then the cluster lines, in that order and in one home folder, as a
    reader goes down the page. The order matters: the quickstart's local Ray leaves a token in
    ~/.ray/auth_token, after which ``ray start --head`` turns authentication on and a submission
    without the token mode is refused."""
    work = repo_copy(tmp_path / "flexray")
    home = tmp_path / "home"
    home.mkdir()

    # 1. The quickstart: install into a new venv, train, log beside the job.
    line = next(ln for ln in bash_lines(section("Two commands")) if "quickstart" in ln)
    assert line == "pip install -e . && flexray run jobs/quickstart.yaml", line
    env = user_env(home, child_venv(tmp_path / "venv"))
    before = {p.name for p in work.iterdir()}
    proc = subprocess.run(["bash", "-ec", line], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # A healthy run's console is quiet: after pip's lines, the result in two lines; on stderr only
    # the progress bar's redraws (and pip's own notices), no ERROR/WARNING/INFO line from Ray or MLflow.
    out = proc.stdout.splitlines()[-2:]
    m = re.fullmatch(r"run (\w+) finished: rounds=15 accuracy=(0\.\d+) sim_time_s=\S+ energy_j=\S+", out[0])
    assert m, proc.stdout[-2000:]
    assert float(m.group(2)) > 0.8
    store = f"sqlite:///{work}/mlflow.db"
    assert out[1] == f"tracked in {store} (view: mlflow ui --backend-store-uri {store})"
    for part in re.split(r"[\r\n]+", proc.stderr):
        assert not part.strip() or part.startswith(("quickstart: ", "[notice]")), repr(part)
    # The store and its files beside the job, nothing else added (but the editable install's metadata).
    added = {p.name for p in work.iterdir()} - before
    assert {n for n in added if not n.endswith(".egg-info")} == {"mlartifacts", "mlflow.db"}, added
    run = MlflowClient(store).get_run(m.group(1))
    assert run.info.artifact_uri.startswith((work / "mlartifacts").as_uri() + "/")
    names = {p.name for p in (work / "mlartifacts").rglob("*") if p.is_file()}
    assert {"events.parquet", "config.yaml", "checkpoint.pt", "MLmodel", "accuracy_vs_time.png", "gantt.png",
            "energy_per_device.png"} <= names, names
    assert not (home / ".flexray").exists() and (home / ".ray" / "auth_token").is_file()

    # 2. Submitting to a Ray cluster, with the flexray that step 1 installed.
    lines = bash_lines(section("Submitting to a Ray cluster"))
    assert any(ln.startswith("ray start --head") for ln in lines) and any("ray job submit" in ln for ln in lines)
    port, dash = free_port(), free_port()
    temp = Path("/tmp") / f"flexray-readme-{os.getpid()}"  # Ray's socket paths must stay short
    isolate = (f" --port={port} --dashboard-port={dash} --temp-dir={temp} --num-cpus=2 --disable-usage-stats"
               f" --dashboard-agent-listen-port={free_port()} --dashboard-agent-grpc-port={free_port()}"
               f" --metrics-export-port={free_port()} --runtime-env-agent-port={free_port()}")
    script = []
    for ln in lines:
        cmd = ln.partition("  #")[0].rstrip()
        if cmd.startswith("ray start --head"):
            cmd += isolate
        script.append(cmd.replace("127.0.0.1:8265", f"127.0.0.1:{dash}"))
    try:
        proc = subprocess.run(["bash", "-ec", "\n".join(script)], cwd=work, env=env, capture_output=True, text=True,
                              timeout=900)
    finally:
        stop_ray_node(temp)
        shutil.rmtree(temp, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Authentication required" not in out
    assert re.search(r"run \w+ finished: rounds=15 accuracy=0\.9", out), out[-3000:]
    assert re.search(r"Job '\S+' succeeded", out), out[-3000:]
    # The job ran in Ray's temporary copy, so it logged to the user's ~/.flexray store, with the
    # artifacts beside it.
    assert (home / ".flexray" / "mlflow.db").is_file()
    assert list((home / ".flexray" / "mlartifacts").rglob("events.parquet"))
    # What the submitted job logged, read back from that store: the quickstart's promise.
    client = MlflowClient(f"sqlite:///{home / '.flexray' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id in out
    acc = client.get_metric_history(run.info.run_id, "accuracy")
    assert [m.step for m in acc] == list(range(1, 16)) and acc[-1].value >= 0.9
    assert run.data.metrics["participants"] == 8
