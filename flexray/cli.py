"""``flexray run | plan | devices | report | probe``. User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

import torch
from mlflow.tracking import MlflowClient

from flexray import phases
from flexray.errors import FlexrayError
from flexray.fleet.calibrate import PASSES, calibrate
from flexray.fleet.probe import describe, nearest_class, probe_host, profile_line
from flexray.fleet.profiles import CATALOG
from flexray.protocol import SubModel
from flexray.runtime.assembly import load_config
from flexray.runtime.driver import use_ray_auth_mode
from flexray.runtime.probe_nodes import probe_nodes
from flexray.runtime.session import Session
from flexray.tracking.mlflow_logger import check_access, resolve_uri


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)  # validate before starting Ray: bad configs fail fast
    phases.mark("config")
    check_access(resolve_uri(cfg.tracking.uri), cfg.tracking.experiment)  # bad credentials fail before Ray starts
    use_ray_auth_mode(cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    result = Session(cfg).fit(resume=args.resume)
    last = result.metrics
    acc = f"{last.accuracy:.4f}" if last is not None and last.accuracy is not None else "n/a"
    print(f"run {result.run_id} finished: rounds={len(result.history)} accuracy={acc} "
          f"sim_time_s={last.sim_time_s if last else 0:.1f} energy_j={last.energy_j if last else 0:.1f}")
    print(f"tracked in {result.tracking_uri} (view: mlflow ui --backend-store-uri {result.tracking_uri})")
    phases.mark("result")
    phases.dump()
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    plan = Session(cfg).plan(args.address)  # the run's own assembly: what refuses the run refuses the plan
    if plan.engine:  # an engine with its own planner (e.g. tiled) prints its plan
        print(plan.engine)
        return 0
    where = plan.placement
    hosts = [s for s in plan.actors if not s.service]
    actor_of = {d: s.label for s in hosts for d in s.devices}
    gpu_of = {d: f"{s.num_gpus:g}" for s in hosts for d in s.devices if s.num_gpus}  # each actor's GPU share
    node_of = {d: where.describe(s.index) for s in hosts for d in s.devices} if where else {}
    knobs = {t.device: _knobs(t.spec) for t in plan.tasks}  # what the method chose per device (cut, share, k, p, ...)
    rows = [(p.name, actor_of[p.device], *([gpu_of[p.device]] if gpu_of else []), *([node_of[p.device]] if node_of else []),
             knobs[p.device], p.samples, p.flops,
             p.download_s, p.compute_s, p.server_s, p.upload_s, p.total_s, p.energy_j, "yes" if p.fits_memory else "NO")
            for p in plan.predictions]
    print(_table(["device", "actor", *(["gpu"] if gpu_of else []), *(["node"] if node_of else []), "plan", "samples", "flops", "down_s", "compute_s",
                  "server_s", "up_s", "total_s", "energy_j", "fits_mem"], rows))
    if plan.left_out:
        print(f"\nno sub-model fits the memory of: {', '.join(plan.left_out)} (they get no task)")
    mprof = plan.model
    print(f"\nmodel {cfg.model.name}: {mprof.param_bytes / 1e6:.3f} MB, {mprof.train_flops_per_sample / 1e6:.3f} MFLOP/sample (train)")
    print(f"predicted round time: {plan.round_s:.4g} s simulated "
          f"({len(plan.predictions)} of {plan.devices} devices available at t=0)")
    if plan.target_s is not None:  # a method with sub-models: which rule chose them, and for what round time
        print(f"sub-models chosen by schedule.mode={cfg.schedule.mode} for a round of {plan.target_s:.4g} s")
    if plan.held_out:
        n_train = plan.train_samples
        print(f"held out for the server: {plan.held_out} of {n_train} training samples (the method's proxy_samples); "
              f"the devices share the other {n_train - plan.held_out}")
    for s in (s for s in plan.actors if s.service):  # the round service's actors (SplitFed: its split server)
        at = f" on {where.describe(s.index)}" if where else ""
        print(f"{s.role}: {s.num_cpus:g} CPU, {s.num_gpus:g} GPU{at}")
    for line in plan.notes:
        print(line)
    return 0


def _knobs(spec: SubModel) -> str:
    shown = {k: v for k, v in spec.log().items() if k not in ("memory_bytes", "predicted_s")}
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) or "-"


def cmd_probe(args: argparse.Namespace) -> int:
    model, width, data, batch = args.model, args.width, args.data, args.batch_size
    if args.config:
        cfg = load_config(args.config, [])
        model, width, data, batch = cfg.model.name, cfg.model.width, cfg.data.name, cfg.method.batch_size
    if args.like and args.like not in CATALOG:
        raise FlexrayError(f"probe: --like {args.like!r}: unknown device class; use one of {', '.join(CATALOG)}")
    if args.seconds <= 0:
        raise FlexrayError("probe: --seconds must be > 0")
    cal_s = None if args.coarse else args.calibration_seconds
    if cal_s is not None and cal_s <= 0:
        raise FlexrayError("probe: --calibration-seconds must be > 0")
    if args.calibration_passes < 1:
        raise FlexrayError("probe: --calibration-passes must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise FlexrayError("probe: --device cuda: no CUDA GPU on this machine; drop --device or run it on a GPU host")
    if args.address:
        probes = probe_nodes(args.address, model, width, data, batch, args.seconds, args.threads, cal_s,
                             args.calibration_passes)
        named = [(f"{args.name or p.host}_{i}" if len(probes) > 1 and args.name else args.name or p.host, p)
                 for i, (_, p) in enumerate(probes)]
    else:
        probe = probe_host(model, width, data, batch, args.seconds, args.threads, None)
        if cal_s is not None:  # the bar on stderr; the profile stays pasteable from stdout
            probe = dataclasses.replace(probe, calibration=calibrate(seconds=cal_s, threads=args.threads, progress=True,
                                                                     device=args.device, passes=args.calibration_passes))
        named = [(args.name or probe.host, probe)]
    for name, probe in named:
        like = CATALOG[args.like] if args.like else CATALOG.get(name) or nearest_class(probe.result.flops)
        for line in describe(probe, like, model, width, data, batch):
            print(line)
        print(profile_line(name, probe, like))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    rows = [(p.name, p.flops / 1e9, p.memory_bytes / 2**30, p.uplink_bps / 1e6, p.downlink_bps / 1e6, p.rtt_s * 1e3,
             p.power_active_w, p.power_idle_w, p.power_radio_w) for p in CATALOG.values()]
    print(_table(["class", "GFLOP/s", "mem_GiB", "up_Mbit/s", "down_Mbit/s", "rtt_ms", "active_W", "idle_W", "radio_W"], rows))
    print("\n(GFLOP/s: dense conv; every class also has a per-layer latency model, docs/latency.md)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    uri = resolve_uri(args.uri)
    client = MlflowClient(uri)
    try:
        run = client.get_run(args.run_id)
    except Exception:  # noqa: BLE001
        raise FlexrayError(f"report: no run {args.run_id!r} at {uri} (pass --uri or set MLFLOW_TRACKING_URI)") from None
    p = run.data.params
    print(f"run {args.run_id} ({run.info.status}) job={p.get('name')} method={p.get('method.name')} "
          f"model={p.get('model.name')} data={p.get('data.name')} experiment={run.info.experiment_id}")
    keys = ["accuracy", "loss", "sim_time_s", "round_sim_s", "energy_j", "participants", "stragglers", "bytes_up", "wall_time_s"]
    hist = {k: {m.step: m.value for m in client.get_metric_history(args.run_id, k)} for k in keys}
    steps = sorted(set().union(*(h.keys() for h in hist.values())))
    rows = [[s, *(hist[k].get(s, "") for k in keys)] for s in steps]
    print(_table(["round", *keys], rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flexray", description="Training across heterogeneous devices on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, fn, text in (("run", cmd_run, "run (or --resume) a job"), ("plan", cmd_plan, "predict one round without training")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="job YAML, e.g. jobs/quickstart.yaml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. rounds.num=5")
        p.set_defaults(fn=fn)
    sub.choices["run"].add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint")
    sub.choices["plan"].add_argument("--address", metavar="HOST:PORT",
                                     help="a running Ray cluster: show the node each device actor lands on (or fail)")
    pp = sub.add_parser("probe", help="calibrate this machine's latency model (or every board's, with --address); "
                        "prints a fleet.profiles line")
    pp.add_argument("--address", metavar="HOST:PORT", help="a running Ray cluster: probe every node on its own actor")
    pp.add_argument("--coarse", action="store_true", help="FLOP/s only, no per-layer calibration")
    pp.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="calibrate on the CPU (default) or the GPU")
    pp.add_argument("--calibration-seconds", type=float, default=0.15,
                    help="seconds each calibration case is timed per pass (default 0.15: about 1.5 minutes in all)")
    pp.add_argument("--calibration-passes", type=int, default=PASSES,
                    help=f"passes over the suite; each case keeps its fastest (default {PASSES})")
    pp.add_argument("--name", help="profile name to print (default: the host name)")
    pp.add_argument("--config", help="take model, data shape and batch size from this job YAML")
    pp.add_argument("--model", default="cnn", help="model to train (default cnn)")
    pp.add_argument("--width", type=int, default=32, help="cnn base width (default 32)")
    pp.add_argument("--data", default="cifar10", choices=["digits", "mnist", "fashion_mnist", "cifar10", "cifar100"],
                    help="input shape to train on (default cifar10)")
    pp.add_argument("--batch-size", type=int, default=32)
    pp.add_argument("--seconds", type=float, default=10.0, help="how long to time training (default 10)")
    pp.add_argument("--threads", type=int, help="torch threads (default: torch's choice, all cores)")
    pp.add_argument("--like", help="catalog class to copy bandwidth and power from (default: --name if it is one, else nearest in FLOP/s)")
    pp.set_defaults(fn=cmd_probe)
    sub.add_parser("devices", help="list the device catalog").set_defaults(fn=cmd_devices)
    rp = sub.add_parser("report", help="summarise a run from MLflow")
    rp.add_argument("run_id")
    rp.add_argument("--uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    rp.set_defaults(fn=cmd_report)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    # MLflow announces every new sqlite store at INFO ("Creating initial MLflow database tables");
    # a healthy run shows only the progress bar and the result. Its warnings still print.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("flexray: %(message)s"))
    logger = logging.getLogger("flexray")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    phases.mark("main")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except FlexrayError as err:
        print(f"flexray: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("flexray: interrupted (resume with --resume RUN_ID from the last checkpoint)", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``flexray`` console script: ``main``, then exit without CPython's module teardown.

    After a run, finalizing torch, Ray, MLflow, pyarrow and matplotlib takes about 3 s of a
    2-core machine with nothing left to do: the run is closed, its files written. The atexit
    handlers still run and the output is flushed; only the interpreter's teardown is skipped.
    """
    rc = main()
    logging.shutdown()
    atexit._run_exitfuncs()  # what sys.exit would run first (Ray's, MLflow's, tqdm's handlers)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
