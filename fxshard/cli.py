"""The ``fxshard`` command line: offline inspection of models, devices and (later) plans.

Every command computes with the library and renders here; the library never prints.
Exit status: 0 on success, 2 on bad usage, 1 when the request cannot be met.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from fxshard.errors import DeviceSpecError, FxshardError, PartitionError, ZooError

__all__ = ["main"]

_USAGE_ERRORS = (DeviceSpecError, ZooError)


def _fmt_count(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _fmt_time(s: float) -> str:
    if s == 0:
        return "0"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _console() -> Any:
    from rich.console import Console

    # A fixed width off a terminal keeps piped output and tests readable.
    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=False)


def _write_json(data: Any, dest: str) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    if dest == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(dest, "w", encoding="utf-8") as f:
            f.write(text + "\n")


# ---------------------------------------------------------------------------------------
# fxshard devices
# ---------------------------------------------------------------------------------------

_FLOP_COLUMNS = ("float32", "tf32", "bfloat16", "float16", "float8")


def cmd_devices(args: argparse.Namespace) -> int:
    from fxshard.cluster import LINK_PRESETS, PRESETS, Cluster, format_bytes

    if args.json:
        _write_json({"presets": {n: s.to_dict() for n, s in PRESETS.items()},
                     "links": {n: link.to_dict() for n, link in LINK_PRESETS.items()},
                     "local": Cluster.local().to_dict()}, args.json)
        if args.json == "-":
            return 0
    from rich.table import Table

    console = _console()
    table = Table(title="Device presets (dense peak FLOP/s; sources in docs/devices.md)")
    table.add_column("preset")
    table.add_column("kind")
    table.add_column("memory", justify="right")
    for col in _FLOP_COLUMNS:
        table.add_column(col, justify="right")
    table.add_column("bandwidth", justify="right")
    for name, spec in PRESETS.items():
        flops = dict(spec.peak_flops)
        table.add_row(name, spec.kind, format_bytes(spec.memory_bytes),
                      *[_fmt_count(flops[c], "FLOP/s") if c in flops else "-" for c in _FLOP_COLUMNS],
                      f"{spec.memory_bandwidth / 1e9:,.0f} GB/s")
    console.print(table)
    links = Table(title="Link presets")
    links.add_column("link")
    links.add_column("bandwidth", justify="right")
    links.add_column("latency", justify="right")
    for name, link in LINK_PRESETS.items():
        links.add_row(name, f"{link.bandwidth / 1e9:,.1f} GB/s", _fmt_time(link.latency_s))
    console.print(links)
    console.print(f"This machine: {Cluster.local().describe()}")
    return 0


# ---------------------------------------------------------------------------------------
# fxshard inspect
# ---------------------------------------------------------------------------------------


def _shape_text(node: Any) -> str:
    meta = node.meta.get("tensor_meta")
    if hasattr(meta, "shape"):
        dtype = str(meta.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(map(str, meta.shape))}]"
    if isinstance(meta, (tuple, list)):
        return "(" + ", ".join(f"[{', '.join(map(str, m.shape))}]" for m in meta if hasattr(m, "shape")) + ")"
    return ""


def inspect_model(model_ref: str, *, device: str, batch_size: int | None, seq_len: int | None,
                  cost_model: str, method: str) -> dict:
    """Capture and price a model; returns the ``inspect --json`` document."""
    from fxshard.capture import capture
    from fxshard.cluster import get_preset
    from fxshard.cost_models import estimate
    from fxshard.zoo import resolve

    spec = get_preset(device)
    t0 = time.perf_counter()
    built = resolve(model_ref, batch_size=batch_size, seq_len=seq_len)
    captured = capture(built.model, built.example_inputs, method=method)
    t1 = time.perf_counter()
    costs = estimate(captured, spec, cost_model=cost_model)
    t2 = time.perf_counter()
    rows = []
    for node, cost in zip(captured.gm.graph.nodes, costs):
        row = cost.to_row()
        row["shape"] = _shape_text(node)
        rows.append(row)
    param_bytes, buffer_bytes = costs.state_bytes()
    return {
        "model": {"name": built.name, "class": captured.model_name, "method": captured.method,
                  "fingerprint": captured.fingerprint(), "nodes": len(rows)},
        "device": spec.to_dict(),
        "cost_model": costs.cost_model,
        "totals": {"param_bytes": param_bytes, "buffer_bytes": buffer_bytes,
                   "fwd_flops": costs.fwd_flops, "bwd_flops": costs.bwd_flops,
                   "fwd_time_s": costs.fwd_time_s, "bwd_time_s": costs.bwd_time_s,
                   "saved_activation_bytes": costs.saved_activation_bytes()},
        "seconds": {"capture": t1 - t0, "cost": t2 - t1},
        "nodes": rows,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from fxshard.cluster import format_bytes

    with _progress(f"capturing and pricing {args.model}"):
        doc = inspect_model(args.model, device=args.device, batch_size=args.batch_size,
                            seq_len=args.seq_len, cost_model=args.cost_model, method=args.method)
    if args.json:
        _write_json(doc, args.json)
        if args.json == "-":
            return 0
    from rich.table import Table

    rows = doc["nodes"]
    if args.top:
        rows = sorted(rows, key=lambda r: r["fwd_time_s"] + r["bwd_time_s"], reverse=True)[: args.top]
    table = Table(title=f"{doc['model']['name']} on {doc['device']['name']} ({doc['cost_model']} costs, "
                        f"{doc['model']['method']}, {doc['model']['nodes']} nodes)")
    for col, justify in (("node", "left"), ("op", "left"), ("target", "left"), ("output", "left"),
                         ("fwd FLOP", "right"), ("params", "right"), ("out bytes", "right"),
                         ("fwd", "right"), ("bwd", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["op"], r["target"][:48], r["shape"], _fmt_count(r["flops"]),
                      format_bytes(r["param_bytes"]) if r["param_bytes"] else "",
                      format_bytes(r["output_bytes"]) if r["output_bytes"] else "",
                      _fmt_time(r["fwd_time_s"]), _fmt_time(r["bwd_time_s"]))
    console = _console()
    console.print(table)
    t = doc["totals"]
    console.print(
        f"parameters {format_bytes(t['param_bytes'])} (shared counted once), buffers "
        f"{format_bytes(t['buffer_bytes'])}, forward {_fmt_count(t['fwd_flops'], 'FLOP')}, backward "
        f"{_fmt_count(t['bwd_flops'], 'FLOP')}, activations saved for backward "
        f"{format_bytes(t['saved_activation_bytes'])}; time forward {_fmt_time(t['fwd_time_s'])}, "
        f"backward {_fmt_time(t['bwd_time_s'])}. Captured in {doc['seconds']['capture']:.2f} s, "
        f"priced in {doc['seconds']['cost']:.2f} s.")
    return 0


# ---------------------------------------------------------------------------------------
# fxshard plan / compare / export / simulate
# ---------------------------------------------------------------------------------------


def _progress(message: str) -> Any:
    """A spinner on a terminal's stderr for steps that take seconds; silent otherwise."""
    import contextlib

    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message)


def _plan_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"training": not args.inference, "optimizer": args.optimizer,
                               "partitioner": args.partitioner, "cost_model": args.cost_model}
    for name in ("schedule", "microbatches", "strategy", "stages"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


def _make_plan(args: argparse.Namespace, **overrides: Any) -> tuple[Any, Any, float]:
    """(plan, captured graph, seconds) for the command's MODEL and devices."""
    from fxshard.capture import capture
    from fxshard.cluster import Cluster
    from fxshard.planner import PlanOptions, batch_size_of, plan_captured
    from fxshard.zoo import resolve

    built = resolve(args.model, batch_size=args.batch_size, seq_len=args.seq_len)
    cluster = Cluster.parse(args.devices)
    options = {**_plan_options(args), "name": built.name, **overrides}
    with _progress(f"planning {built.name} on {cluster.describe()}"):
        start = time.perf_counter()
        captured = capture(built.model, built.example_inputs)
        plan = plan_captured(captured, cluster, batch_size_of(captured, built.example_inputs, None),
                             PlanOptions(**options))
        seconds = time.perf_counter() - start
    return plan, captured, seconds


def _print_plan(plan: Any, seconds: float) -> None:
    from rich.table import Table

    from fxshard.cluster import format_bytes

    console = _console()
    e = plan.estimate
    title = (f"{plan.model.name}: {plan.strategy}, {plan.num_stages} stage(s) x {plan.replicas} replica(s)"
             + (f", {plan.schedule}" if plan.schedule else "") + f", {plan.microbatches} micro-batch(es)")
    table = Table(title=title)
    for col, justify in (("stage", "right"), ("devices", "left"), ("first .. last", "left"), ("nodes", "right"),
                         ("params", "right"), ("peak / capacity", "right"), ("fwd", "right"), ("bwd", "right"),
                         ("sends", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for s in plan.stages:
        share = s.peak_memory_bytes / s.memory_capacity_bytes if s.memory_capacity_bytes else 0.0
        span = f"{s.first_module or (s.nodes[0] if s.nodes else '')} .. {s.last_module or (s.nodes[-1] if s.nodes else '')}"
        devices = f"{','.join(map(str, s.device_indices))}: {'/'.join(sorted(set(s.devices)))}"
        table.add_row(str(s.index), devices, span, str(len(s.nodes)), format_bytes(s.param_bytes),
                      f"{format_bytes(s.peak_memory_bytes)} / {format_bytes(s.memory_capacity_bytes)} ({share:.0%})",
                      _fmt_time(s.fwd_time_s), _fmt_time(s.bwd_time_s), format_bytes(s.send_bytes))
    console.print(table)
    console.print(f"estimate: step {_fmt_time(e.step_time_s)}, bubble {e.bubble_fraction:.1%}, "
                  f"{e.samples_per_s:,.1f} samples/s (lower bound {_fmt_time(e.lower_bound_step_time_s)}); "
                  f"batch {plan.batch_size}, {'training with ' + plan.optimizer if plan.training else 'inference'}")
    if plan.reason:
        console.print(f"why: {plan.reason}")
    alts = Table(title="alternatives considered (best first)")
    for col in ("strategy", "stages x replicas", "schedule", "micro-batches", "samples/s", "peak memory", "fits"):
        alts.add_column(col)
    for a in plan.alternatives[:8]:
        alts.add_row(a.strategy, f"{a.stages} x {a.replicas}", a.schedule or "-", str(a.microbatches),
                     f"{a.samples_per_s:,.1f}" if a.fits else "-",
                     format_bytes(a.peak_memory_bytes) if a.peak_memory_bytes >= 0 else "-",
                     "yes" if a.fits else f"no: {a.note[:60]}")
    console.print(alts)
    console.print(f"planned in {seconds:.1f} s")


def cmd_plan(args: argparse.Namespace) -> int:
    plan, captured, seconds = _make_plan(args)
    if args.json:
        with _output(args.json) as f:
            f.write(plan.to_json() + "\n")
        if args.json == "-":
            return 0
    _print_plan(plan, seconds)
    if args.png or args.dot:
        from fxshard import viz

        if args.png:
            viz.plan_png(plan, args.png)
        if args.dot:
            modules = {n.name: _node_module(n) for n in captured.gm.graph.nodes}
            edges = [(a.name, b.name) for b in captured.gm.graph.nodes for a in b.all_input_nodes]
            with _output(args.dot) as f:
                f.write(viz.plan_dot(plan, edges, node_module=modules))
    return 0


def _node_module(node: Any) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple)]
    if node.op in ("call_module", "get_attr"):
        return str(node.target) if node.op == "call_module" else str(node.target).rpartition(".")[0]
    return paths[-1] if paths else ""


def _output(dest: str) -> Any:
    import contextlib

    if dest == "-":
        return contextlib.nullcontext(sys.stdout)
    return open(dest, "w", encoding="utf-8")


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.table import Table

    from fxshard.cluster import format_bytes
    from fxshard.passes.partition import partitioners

    names = args.partitioners.split(",") if args.partitioners else partitioners()
    unknown = [n for n in names if n not in partitioners()]
    if unknown:
        raise PartitionError(f"unknown partitioner(s) {', '.join(unknown)}; registered: {', '.join(partitioners())}")
    rows = []
    for name in names:
        try:
            plan, _, seconds = _make_plan(args, partitioner=name, strategy=args.strategy or "pipeline")
        except FxshardError as e:
            rows.append({"partitioner": name, "error": str(e)})
            continue
        bottleneck = max(s.fwd_time_s + s.bwd_time_s for s in plan.stages)
        rows.append({"partitioner": name, "strategy": plan.strategy, "stages": plan.num_stages,
                     "replicas": plan.replicas, "schedule": plan.schedule, "microbatches": plan.microbatches,
                     "step_time_s": plan.estimate.step_time_s, "samples_per_s": plan.estimate.samples_per_s,
                     "bottleneck_stage_time_s": bottleneck,
                     "lower_bound_step_time_s": plan.estimate.lower_bound_step_time_s,
                     "cut_bytes": sum(s.send_bytes for s in plan.stages) * plan.microbatches,
                     "max_stage_memory_bytes": max(s.peak_memory_bytes for s in plan.stages),
                     "plan_seconds": seconds})
    ok = [r for r in rows if "error" not in r]
    best = min(ok, key=lambda r: r["step_time_s"])["partitioner"] if ok else None
    for r in rows:
        r["best"] = r["partitioner"] == best
    if args.json:
        _write_json(rows, args.json)
        if args.json == "-":
            return 0 if ok else 1
    table = Table(title=f"{args.model} on {args.devices}: partitioners compared (best marked *)")
    for col in ("partitioner", "plan", "step", "samples/s", "bottleneck stage", "lower bound", "cut / step",
                "max stage memory", "seconds"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["partitioner"], f"error: {r['error'][:70]}", *[""] * 7)
            continue
        table.add_row(("* " if r["best"] else "") + r["partitioner"],
                      f"{r['stages']}x{r['replicas']} {r['schedule']} m={r['microbatches']}",
                      _fmt_time(r["step_time_s"]), f"{r['samples_per_s']:,.1f}", _fmt_time(r["bottleneck_stage_time_s"]),
                      _fmt_time(r["lower_bound_step_time_s"]), format_bytes(r["cut_bytes"]),
                      format_bytes(r["max_stage_memory_bytes"]), f"{r['plan_seconds']:.1f}")
    _console().print(table)
    return 0 if ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from fxshard.export import export_plan

    plan, captured, _ = _make_plan(args)
    result = export_plan(captured, plan, args.out, model_ref=args.model)
    console = _console()
    console.print(f"exported {plan.strategy} plan of {plan.model.name} ({plan.num_stages} stage(s)) to {args.out}:")
    for path in result.files:
        console.print(f"  {path}")
    for note in result.notes:
        console.print(f"  note: {note}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fxshard.calibrate import calibrate
    from fxshard.zoo import resolve

    plan, captured, _ = _make_plan(args)
    built = resolve(args.model, batch_size=args.batch_size, seq_len=args.seq_len)
    with _progress(f"measuring {plan.num_stages} stage(s) of {plan.model.name}"):
        report = calibrate(captured, plan, built.example_inputs, device=args.device, repeats=args.repeats,
                           profiled=not args.no_profiled)
    if args.json:
        with _output(args.json) as f:
            f.write(report.to_json() + "\n")
        if args.json == "-":
            return 0
    if args.md:
        with _output(args.md) as f:
            f.write(report.to_markdown() + "\n")
    if args.png:
        from fxshard import viz

        viz.calibration_png(report, args.png)
    _console().print(report.to_markdown())
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fxshard import viz
    from fxshard.plan import Plan
    from fxshard.simulate import to_chrome_trace

    try:
        text = Path(args.plan).read_text(encoding="utf-8")
    except OSError as e:
        raise ZooError(f"cannot read plan file {args.plan!r}: {e.strerror}; write one with "
                       f"'fxshard plan MODEL --devices SPEC --json {args.plan}'") from e
    plan = Plan.from_json(text)
    result = viz.simulate_plan(plan, schedule=args.schedule, microbatches=args.microbatches)
    samples = plan.batch_size / result.step_time_s if result.step_time_s else 0.0
    console = _console()
    console.print(f"{plan.model.name}: {result.schedule}, {result.stages} stage(s) on {result.ranks} rank(s), "
                  f"{result.microbatches} micro-batch(es): step {_fmt_time(result.step_time_s)}, bubble "
                  f"{result.bubble_fraction:.1%}, {samples:,.1f} samples/s (planned: "
                  f"{_fmt_time(plan.estimate.step_time_s)} with {plan.schedule or 'no schedule'}, "
                  f"m={plan.microbatches})")
    for rank, (busy, idle) in enumerate(zip(result.busy_s, result.idle_s)):
        console.print(f"  rank {rank}: busy {_fmt_time(busy)}, idle {_fmt_time(idle)}")
    if args.png:
        viz.timeline_png(result, args.png, title=f"{plan.model.name}: {result.schedule}, m={result.microbatches}")
    if args.trace:
        with _output(args.trace) as f:
            f.write(to_chrome_trace(result))
    return 0


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxshard", description="Automatic model-parallel compiler for PyTorch: plan, compare, export and "
                                    "simulate model-parallel training; inspect models and devices.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("devices", help="the device presets and their figures")
    p.add_argument("--json", metavar="FILE", help="write presets, links and this machine as JSON ('-' for stdout)")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("inspect", help="the captured graph, one row per node, with its costs")
    p.add_argument("model", metavar="MODEL",
                   help="a built-in model name (see 'fxshard inspect --help') or path/file.py:factory or pkg.mod:factory")
    p.add_argument("--device", default="H100-80GB", metavar="PRESET", help="device preset to price on (default H100-80GB)")
    p.add_argument("--batch-size", type=int, metavar="N", help="batch size of the example inputs")
    p.add_argument("--seq-len", type=int, metavar="N", help="sequence length for language models")
    p.add_argument("--cost-model", default="analytical", choices=("analytical", "profiled"),
                   help="how node times are estimated (default analytical)")
    p.add_argument("--method", default="auto", choices=("auto", "symbolic_trace", "export"),
                   help="capture method (default: symbolic_trace, then torch.export)")
    p.add_argument("--top", type=int, metavar="N", help="show only the N most expensive nodes")
    p.add_argument("--json", metavar="FILE", help="write the rows and totals as JSON ('-' for stdout)")
    p.set_defaults(func=cmd_inspect)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", metavar="MODEL", help="a built-in model name or path/file.py:factory or pkg.mod:factory")
        p.add_argument("--devices", required=True, metavar="SPEC",
                       help="the cluster: 8, 8xA100-80GB, 2x8xH100-80GB, 4xcpu:2GB, or a comma-free device list")
        p.add_argument("--batch-size", type=int, metavar="N", help="batch size of the example inputs")
        p.add_argument("--seq-len", type=int, metavar="N", help="sequence length for language models")
        p.add_argument("--partitioner", default="metis", metavar="NAME", help="partitioner (default metis)")
        p.add_argument("--schedule", metavar="NAME", help="gpipe, 1f1b, interleaved1f1b, zbv, ... (default: auto)")
        p.add_argument("--microbatches", type=int, metavar="M", help="micro-batches per step (default: auto)")
        p.add_argument("--strategy", choices=("single", "ddp", "pipeline", "hybrid"), help="force a strategy")
        p.add_argument("--stages", type=int, metavar="K", help="force the pipeline depth (default: auto)")
        p.add_argument("--optimizer", default="adam", choices=("adam", "sgd", "none"),
                       help="optimizer state per parameter (default adam)")
        p.add_argument("--cost-model", default="analytical", choices=("analytical", "profiled"))
        p.add_argument("--inference", action="store_true", help="plan forward only (no gradients or optimizer)")

    p = sub.add_parser("plan", help="plan a model on a cluster: stages, strategy, schedule, estimate")
    model_args(p)
    p.add_argument("--json", metavar="FILE", help="write the plan as JSON ('-' for stdout)")
    p.add_argument("--png", metavar="FILE", help="stage bars and the simulated schedule timeline")
    p.add_argument("--dot", metavar="FILE", help="the stage-coloured graph, modules collapsed (Graphviz)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compare", help="one pipeline plan per partitioner, side by side")
    model_args(p)
    p.add_argument("--partitioners", metavar="A,B,C", help="comma-separated names (default: all registered)")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON ('-' for stdout)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="stage sources, plan.json, a torchrun launcher, split specs")
    model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("calibrate", help="run the plan's stages on this machine and compare with predictions")
    model_args(p)
    p.add_argument("--device", metavar="DEVICE", help="torch device to measure on (default: cuda if present, else cpu)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed runs per measurement (median kept)")
    p.add_argument("--no-profiled", action="store_true", help="skip the profiled cost model (faster)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' for stdout)")
    p.add_argument("--md", metavar="FILE", help="write the report as a markdown table")
    p.add_argument("--png", metavar="FILE", help="predicted against measured stage times")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("simulate", help="what-if on a saved plan: another schedule or micro-batch count")
    p.add_argument("plan", metavar="PLAN.json")
    p.add_argument("--schedule", metavar="NAME", help="simulate with this schedule instead")
    p.add_argument("--microbatches", type=int, metavar="M", help="simulate with this many micro-batches")
    p.add_argument("--png", metavar="FILE", help="the timeline, one row per rank")
    p.add_argument("--trace", metavar="FILE", help="Chrome trace JSON (chrome://tracing, Perfetto)")
    p.set_defaults(func=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len", "top", "microbatches", "stages"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    try:
        return args.func(args)
    except FxshardError as e:
        if args.debug:
            raise
        print(f"fxshard {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, _USAGE_ERRORS) else 1
    except OSError as e:  # an output path that cannot be written
        if args.debug:
            raise
        print(f"fxshard {args.command}: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxshard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
