"""Render the result tables of docs/benchmarks.md from benchmarks/results/*.jsonl.

Why: the JSON lines the benchmark scripts print are the record (each with its date, machine and
exact command); tables copied by hand drift from them. This script keeps every table in
docs/benchmarks.md a pure function of those files: each ``<!-- results:NAME -->`` ...
``<!-- /results:NAME -->`` block holds the table(s) for ``benchmarks/results/NAME.jsonl``.
Add a run by appending its lines (plus ``date``, ``machine``, ``command``) and rerunning this.

    python benchmarks/render_results.py           # rewrite the blocks in docs/benchmarks.md
    python benchmarks/render_results.py --check   # exit 1 if docs/benchmarks.md is out of date

Stdlib only, so it runs anywhere, without the project installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "benchmarks.md"
NONE = "–"

Row = dict[str, Any]
Cell = Callable[[Row], str]


def show(value: Any) -> str:
    """A JSON value as it appears in a table cell."""
    if value is None:
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " / ".join(show(v) for v in value) if all(not isinstance(v, list) for v in value) else json.dumps(value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def percent(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return show(value)
    return f"{value * 100:.2f}".rstrip("0").rstrip(".") + "%"


def val(key: str) -> Cell:
    return lambda row: show(row.get(key))


def pct(key: str) -> Cell:
    """A fraction (or a list of them) as percentages."""

    def cell(row: Row) -> str:
        v = row.get(key)
        return " / ".join(percent(x) for x in v) if isinstance(v, list) else percent(v)

    return cell


def times(key: str) -> Cell:
    return lambda row: NONE if row.get(key) is None else f"{row[key]}×"


def grid(key: str) -> Cell:
    return lambda row: "×".join(map(str, row[key])) if isinstance(row.get(key), list) else show(row.get(key))


def worst_submodel(row: Row) -> str:
    """The least accurate sub-model (``submodel_acc``), e.g. ``8.9% (k4)``."""
    accs: dict[str, float] = row.get("submodel_acc") or {}
    if not accs:
        return NONE
    name = min(accs, key=lambda k: accs[k])
    return f"{percent(accs[name])} ({name.removeprefix('acc_')})"


def method_spec(row: Row) -> str:
    """split_e2e's ``method`` object: name, then its options."""
    m: dict[str, Any] = row.get("method") or {}
    return " ".join([str(m.get("name", NONE))] + [f"{k}={v}" for k, v in m.items() if k != "name"])


@dataclass(frozen=True)
class Table:
    columns: list[tuple[str, Cell]]
    title: str = ""  # shown above the table when a benchmark has several
    select: Callable[[Row], bool] = lambda row: True


RUN_COLUMNS = ["cmd", "date", "machine"]  # every table ends with where its lines came from
SPECS: dict[str, list[Table]] = {
    "overhead": [Table([
        ("devices", val("devices")), ("images / device", val("images_per_device")), ("rounds", val("rounds")),
        ("steady round s plain / flexray", lambda r: f"{r['plain_steady_round_s']} / {r['flexray_steady_round_s']}"),
        ("steady ratio", times("steady_round_ratio")),
        ("job s plain / flexray", lambda r: f"{r['plain_job_s']} / {r['flexray_job_s']}"),
        ("job ratio", times("job_ratio")),
        ("accuracy plain / flexray", lambda r: f"{percent(r['plain_accuracy'])} / {percent(r['flexray_accuracy'])}"),
        ("peak RSS MB plain / flexray", lambda r: f"{r['plain_peak_rss_mb']} / {r['flexray_peak_rss_mb']}"),
        ("cpus", val("cpus"))])],
    "startup": [Table([
        ("code", val("code")), ("quickstart wall s", val("quickstart_wall_s")), ("bare Ray s", val("bare_ray_wall_s")),
        ("ratio", times("ratio_vs_bare_ray")),
        ("phases s", lambda r: ", ".join(f"{k} {v}" for k, v in r["phases_s"].items())),
        ("accuracy", pct("accuracy")), ("repeats", val("repeats"))])],
    "async_vs_sync": [
        Table([("method", val("method")), ("client updates", val("client_updates")), ("final acc", pct("final_accuracy")),
               ("target", pct("target_accuracy")), ("sim s to target", val("sim_time_to_target_s")),
               ("vs sync", times("time_ratio_vs_sync")), ("sim s total", val("sim_time_total_s")),
               ("energy J", val("energy_j")), ("speed spread", times("speed_spread")), ("wall s", val("wall_s"))],
              "FedAvg: sync vs the FedAsync and FedBuff policies (`--part fedavg`)", lambda r: "variant" not in r),
        Table([("variant", val("variant")), ("model", val("model")), ("mode", val("mode")), ("seeds", val("seeds")),
               ("client updates", val("client_updates")), ("final acc", pct("final_accuracy")),
               ("per seed", pct("final_accuracy_per_seed")), ("sim s to target", val("sim_time_to_target_s")),
               ("vs sync", times("time_ratio_vs_sync")), ("per seed ratio", val("time_ratio_per_seed")),
               ("sim s total", val("sim_time_total_s")), ("wall s", val("wall_s"))],
              "Heterogeneous methods, sync vs async rounds (`--part hetero`)", lambda r: "variant" in r)],
    "seeded_metrics": [Table([
        ("job", val("job")), ("commit", val("commit")),
        *[(name, (lambda k: lambda r: show(r["final"].get(k)))(k)) for name, k in (
            ("accuracy", "accuracy"), ("loss", "loss"), ("sim s", "sim_time_s"), ("energy J", "energy_j"),
            ("bytes up", "bytes_up"), ("train loss", "train_loss"), ("mean device acc", "mean_device_acc"))],
        ("wall s", val("wall_s"))])],
    "learning": [Table([
        ("method", val("method")), ("mode", val("mode")), ("model", val("model")), ("global acc", pct("accuracy")),
        ("vs FedAvg", times("vs_fedavg")), ("mean device acc", pct("mean_device_acc")),
        ("sim s", val("sim_time_s")), ("energy J", val("energy_j"))])],
    "latency_fidelity": [
        Table([("threads", val("threads")), ("cases", val("cases")), ("median factor", times("median_factor")),
               ("worst factor", times("worst_factor")), ("old: median", times("median_factor_old")),
               ("old: worst", times("worst_factor_old")), ("goal", val("goal"))],
              "Summary: max(pred/meas, meas/pred) over the held-out cases, per-layer model vs FLOPs / FLOP/s",
              lambda r: bool(r.get("summary"))),
        Table([("sub-model", val("speedup")), ("threads", val("threads")), ("measured speed-up", times("measured")),
               ("predicted", times("predicted")), ("old model predicted", times("predicted_old"))],
              "Width sub-models: speed-up over the full model (one local epoch)", lambda r: "speedup" in r),
        Table([("case", val("case")), ("stands for", val("group")), ("batch", val("batch")), ("threads", val("threads")),
               ("measured s", val("measured_s")), ("spread", times("measured_spread")), ("predicted s", val("predicted_s")),
               ("factor", times("factor")),
               ("old predicted s", val("predicted_old_s")), ("old factor", times("factor_old"))],
              "Every case: one local epoch measured and predicted", lambda r: "case" in r)],
    "hetero_cifar10": [Table([
        ("method", val("method")), ("model", val("model")), ("rounds", val("rounds")), ("seeds", val("seeds")),
        ("mean device acc", pct("mean_device_acc")), ("per seed", pct("mean_device_acc_per_seed")),
        ("global acc", pct("final_accuracy")), ("worst sub-model", worst_submodel),
        ("target", pct("target_accuracy")), ("sim s to target", val("sim_time_to_target_s")),
        ("vs FedAvg-wait", times("time_ratio_vs_fedavg_wait")), ("sim s total", val("sim_time_total_s")),
        ("energy J", val("energy_j"))])],
    "distreal_reft": [Table([
        ("method", val("method")), ("model", lambda r: r.get("model", "cnn")), ("width", val("width")),
        ("images / device", lambda r: str(r.get("samples_per_device", 250))), ("rounds", val("rounds")), ("seeds", val("seeds")),
        ("final acc (mean)", pct("final_accuracy")), ("per seed", pct("final_accuracy_per_seed")),
        ("best acc", pct("best_accuracy")), ("target", pct("target_accuracy")),
        ("sim s to target (mean)", val("sim_time_to_target_s")), ("per seed", val("sim_time_to_target_per_seed")),
        ("bytes up / update", val("bytes_up_per_update")),
        ("upload reduction vs FedAvg", times("upload_reduction_vs_fedavg")),
        ("updates kept", val("updates_kept")), ("stragglers", val("stragglers")), ("energy J", val("energy_j"))])],
    "tlmp": [
        Table([("model", val("model")), ("cuts", val("cuts")), ("clients", val("clients")), ("fleets", val("fleets")),
               ("max gap %", val("max_gap_pct")), ("mean gap %", val("mean_gap_pct")), ("TLMP s", val("tlmp_s")),
               ("brute force s", val("brute_force_s")), ("fit error", val("fit_error"))],
              "TLMP vs brute force (`tlmp_gap`)", lambda r: r.get("bench") == "tlmp_gap"),
        Table([("model", val("model")), ("clients", val("clients")), ("solve s", val("solve_s")),
               ("max latency s", val("max_latency_s")), ("vs exact %", val("gap_vs_exact_pct")),
               ("split clients", val("split_clients")), ("FL only s", val("fl_only_s")),
               ("best fixed cut s", val("fixed_cut_s")), ("equal shares s", val("equal_shares_s")),
               ("reduction % vs FL / fixed / equal", lambda r: " / ".join(str(r[k]) for k in (
                   "reduction_vs_fl_only_pct", "reduction_vs_fixed_cut_pct", "reduction_vs_equal_shares_pct")))],
              "Scale and baselines (`tlmp_scale`)", lambda r: r.get("bench") == "tlmp_scale"),
        Table([("model", val("model")), ("fleets", val("fleets")), ("within 1%", val("within_1pct")),
               ("worst gap %", val("worst_gap_pct")), ("mean gap %", val("mean_gap_pct")),
               ("worse than best baseline", val("worse_than_best_baseline"))],
              "TLMP vs the exact discrete optimum (`tlmp_vs_exact`)", lambda r: r.get("bench") == "tlmp_vs_exact")],
    "split_e2e": [Table([
        ("run", val("run")), ("method", method_spec), ("rounds", val("rounds")),
        ("samples / round", val("samples_per_round")), ("final acc", pct("final_accuracy")),
        ("mean round sim s", val("mean_round_sim_s")), ("predicted s", val("mean_round_predicted_s")),
        ("max abs pred err s", val("max_abs_pred_err_s")), ("split clients / round", val("split_clients_per_round")),
        ("wall s", val("wall_s")), ("load 1m", val("load_avg_1m"))])],
    "tiled": [
        Table([("model", lambda r: show(r.get("model", "vgg"))), ("input", grid("input")), ("batch", val("batch")),
               ("devices", val("devices")), ("grid", grid("grid")), ("groups (plan for rpi3)", val("groups")),
               ("predicted step s", val("predicted_step_s")), ("sim speedup", times("sim_speedup")),
               ("grouping gain", times("grouping_gain_predicted")),
               ("redundant (grouped / one group)",
                lambda r: f"{r['redundant_fraction']} / {r['redundant_fraction_no_grouping']}"),
               ("peak activation MB", val("peak_activation_mb")),
               ("memory vs 1 device (goal)", lambda r: f"{r['memory_ratio']} (≤ {r['memory_goal']})"),
               ("groups (plan here)", val("real_groups")), ("real step s", val("real_step_s")),
               ("real speedup", times("real_speedup")), ("vs plain PyTorch", times("real_speedup_vs_plain_pytorch")),
               ("2-actor ceiling", times("parallel_ceiling_2_actors")), ("over-committed", val("overcommitted"))],
              "Tiled steps at 1, 2, 4, 6 devices", lambda r: r.get("bench") == "tiled"),
        Table([("devices", val("devices")), ("input", grid("input")), ("batch", val("batch")),
               ("real step s", val("real_step_s")), ("load 1m", val("load_1min"))],
              "Plain PyTorch step, same work", lambda r: r.get("bench") == "tiled_plain_pytorch")],
}


def generic(rows: list[Row]) -> list[Table]:
    """Every scalar field, for a benchmark with no entry in SPECS."""
    skip = {"benchmark", "date", "machine", "command"}
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in skip]
    return [Table([(k, val(k)) for k in keys if all(not isinstance(r.get(k), (dict, list)) for r in rows)])]


def render_table(table: Table, rows: list[Row], commands: list[str]) -> list[str]:
    headers = [name for name, _ in table.columns] + RUN_COLUMNS
    out = [f"**{table.title}**", ""] if table.title else []
    out += ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for row in rows:
        cells = [cell(row) for _, cell in table.columns]
        cells += [str(commands.index(row["command"]) + 1), show(row.get("date")), show(row.get("machine"))]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return out


def render_block(name: str, rows: list[Row]) -> str:
    commands = list(dict.fromkeys(row["command"] for row in rows))
    parts: list[str] = []
    for table in SPECS.get(name) or generic(rows):
        selected = [row for row in rows if table.select(row)]
        if selected:
            parts += render_table(table, selected, commands) + [""]
    parts += [f"{i}. `{command}`" for i, command in enumerate(commands, 1)]
    intro = f"Rendered from `benchmarks/results/{name}.jsonl`; `cmd` numbers the commands below."
    return "\n".join(["", intro, ""] + parts) + "\n"


def load(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def render(doc: str, results: dict[str, list[Row]]) -> str:
    """``doc`` with every results block replaced; a block without results (or results without a block) is an error."""
    for name, rows in results.items():
        start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
        i, j = doc.find(start), doc.find(end)
        if i < 0 or j < i:
            raise SystemExit(f"{DOC.relative_to(REPO)}: no '{start}' ... '{end}' block for {name}")
        doc = doc[: i + len(start)] + render_block(name, rows) + doc[j:]
    stale = {part.split(" -->")[0] for part in doc.split("<!-- results:")[1:]} - results.keys()
    if stale:
        raise SystemExit(f"{DOC.relative_to(REPO)}: blocks with no results file: {', '.join(sorted(stale))}")
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is not what it would render")
    args = ap.parse_args(argv)
    results = {path.stem: load(path) for path in sorted(RESULTS.glob("*.jsonl"))}
    current = DOC.read_text()
    rendered = render(current, results)
    if args.check:
        if rendered != current:
            print(f"{DOC.relative_to(REPO)} is out of date: run python benchmarks/render_results.py", file=sys.stderr)
            return 1
        return 0
    if rendered != current:
        DOC.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
