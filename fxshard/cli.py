"""The ``fxshard`` command line: plan, compare, export, calibrate and simulate (devices and inspect in
fxshard/cli_inspect.py).

Every command computes with the library and renders here (tables in fxshard/cli_text.py); the
library never prints. Exit status: 0 on success, 2 on bad usage (argparse's errors, unknown
models, devices, partitioners, schedules or cost models, options that contradict each other),
1 when the request cannot be met. Messages name the CLI's flags, not Python's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

from fxshard.cli_inspect import cmd_devices, cmd_inspect
from fxshard.cli_parser import build_parser, check_names
from fxshard.cli_text import (
    cli_words,
    compare_table,
    console,
    fmt_time,
    print_plan,
    progress,
    write_json,
    wrote,
)
from fxshard.errors import DeviceSpecError, FxshardError, UsageError, ZooError

__all__ = ["main"]

_USAGE_ERRORS = (DeviceSpecError, ZooError, UsageError)


# ---------------------------------------------------------------------------------------
# fxshard plan / compare / export / simulate
# ---------------------------------------------------------------------------------------


def _plan_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"training": not args.inference, "optimizer": args.optimizer,
                               "partitioner": args.partitioner, "cost_model": args.cost_model,
                               "exhaustive": bool(getattr(args, "exhaustive", False))}
    for name in ("schedule", "microbatches", "strategy", "stages", "activation_checkpointing", "data_parallel",
                 "factors"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


@dataclasses.dataclass(frozen=True)
class _Job:
    """A command's model, resolved and captured once, and its cluster."""

    built: Any
    captured: Any
    cluster: Any
    batch: int


def _prepare(args: argparse.Namespace, partitioners: Sequence[str] = ()) -> _Job:
    from fxshard.capture import capture
    from fxshard.cluster import Cluster
    from fxshard.planner import batch_size_of
    from fxshard.zoo import resolve

    built = resolve(args.model, batch_size=args.batch_size, seq_len=args.seq_len)
    check_names(partitioners=partitioners or [args.partitioner], schedule=args.schedule, cost_model=args.cost_model)
    cluster = Cluster.parse(args.devices)
    with progress(f"capturing {built.name}"):
        captured = capture(built.model, built.example_inputs, example_kwargs=built.example_kwargs)
    return _Job(built, captured, cluster, batch_size_of(captured, built.example_inputs, built.example_kwargs))


def _options(job: _Job, args: argparse.Namespace, **overrides: Any) -> Any:
    from fxshard.planner import PlanOptions

    try:
        return PlanOptions(**{**_plan_options(args), "name": job.built.name, **overrides})
    except FxshardError as e:  # options that contradict each other: bad usage
        raise UsageError(str(e)) from e


def _plan_job(job: _Job, args: argparse.Namespace, **overrides: Any) -> tuple[Any, float]:
    """(plan, seconds spent planning) for the job under the command's options and ``overrides``."""
    from fxshard.planner import plan_captured

    opts = _options(job, args, **overrides)
    with progress(f"planning {job.built.name} on {job.cluster.describe()}"):
        start = time.perf_counter()
        plan = plan_captured(job.captured, job.cluster, job.batch, opts)
    return plan, time.perf_counter() - start


def _make_plan(args: argparse.Namespace, **overrides: Any) -> tuple[Any, Any, float]:
    """(plan, captured graph, seconds) for the command's MODEL and devices."""
    job = _prepare(args)
    plan, seconds = _plan_job(job, args, **overrides)
    return plan, job.captured, seconds


def cmd_plan(args: argparse.Namespace) -> int:
    job = _prepare(args)
    plan, seconds = _plan_job(job, args)
    if args.json == "-":
        sys.stdout.write(plan.to_json() + "\n")
        return 0
    unforced = None
    forced = {name: getattr(args, name) for name in ("strategy", "data_parallel", "activation_checkpointing")
              if getattr(args, name) is not None}
    if forced:  # what the planner would pick unforced, to say what forcing costs
        try:
            unforced, more = _plan_job(job, args, **dict.fromkeys(forced))
            seconds += more
        except FxshardError:
            unforced = None
    if args.json:
        with _output(args.json) as f:
            f.write(plan.to_json() + "\n")
    flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in forced.items())
    print_plan(plan, seconds, unforced, flags or None)
    wrote("the plan as JSON", args.json)
    if args.png:
        from fxshard import viz

        viz.plan_png(plan, args.png)
        wrote("the plan's picture", args.png)
    if args.dot:
        from fxshard import viz

        outline = viz.graph_outline(job.captured)
        with _output(args.dot) as f:
            f.write(viz.plan_dot(plan, list(outline.edges), node_module=outline.node_module))
        wrote("the stage graph (Graphviz DOT)", args.dot)
    return 0


def _output(dest: str) -> Any:
    import contextlib

    if dest == "-":
        return contextlib.nullcontext(sys.stdout)
    return open(dest, "w", encoding="utf-8")


def cmd_compare(args: argparse.Namespace) -> int:
    from fxshard.compare import compare
    from fxshard.passes.partition import partitioners

    # milp is an exact solver with a time limit per partition: a reference to ask for by name
    names = args.partitioners.split(",") if args.partitioners else [n for n in partitioners() if n != "milp"]
    job = _prepare(args, names)
    with progress(f"planning {job.built.name} on {job.cluster.describe()} per strategy and partitioner"):
        rows = [r.to_dict() for r in compare(job.captured, job.cluster, job.batch, _options(job, args), names)]
    for r in rows:
        if "error" in r:
            r["error"] = cli_words(r["error"])
    ok = [r for r in rows if "error" not in r]
    if args.json:
        write_json(rows, args.json)
        if args.json == "-":
            return 0 if ok else 1
    compare_table(rows, f"{args.model} on {args.devices}: strategies and partitioners compared (best marked *)")
    wrote("the rows as JSON", args.json)
    return 0 if ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from fxshard.export import export_plan

    plan, captured, _ = _make_plan(args)
    result = export_plan(captured, plan, args.out, model_ref=args.model)
    out = console()
    levers = plan.levers_text()
    out.print(f"exported {plan.strategy} plan ({plan.shape_text()}{', ' + levers if levers else ''}) of "
              f"{plan.model.name} to {args.out}:")
    for path in result.files:
        out.print(f"  {path}")
    for note in result.notes:
        out.print(f"  note: {cli_words(note)}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fxshard.calibrate import calibrate

    if args.save_factors and args.no_profiled:
        raise UsageError("--save-factors needs the fit, which times every node: drop --no-profiled")
    if args.profile_in_ranks and (args.ranks is None or args.no_profiled):
        raise UsageError("--profile-in-ranks profiles the plan on the ranks of --ranks N: "
                         + ("drop --no-profiled" if args.no_profiled else "add --ranks N, or drop it"))
    job = _prepare(args)
    plan, _ = _plan_job(job, args)
    if args.ranks is not None:
        return _calibrate_ranks(args, job, plan)
    with progress(f"measuring {plan.num_stages} stage(s) of {plan.model.name}"):
        report = calibrate(job.captured, plan, job.built.example_inputs, device=args.device, repeats=args.repeats,
                           profiled=not args.no_profiled, factors=args.factors, threads=args.threads)
    if args.save_factors:
        from fxshard.calibrate import save_factors

        if report.fit is None:
            raise UsageError("--save-factors needs fitted factors: drop --no-profiled, and use a model with at "
                             "least 3 timed kernels")
        save_factors(report, args.save_factors)
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
    console().print(report.to_markdown())
    wrote("the report as JSON", args.json)
    wrote("the report as markdown", args.md)
    wrote("the predicted-against-measured picture", args.png)
    wrote(f"the fitted factors of {report.device_spec} (plan with --factors {args.save_factors})", args.save_factors)
    return 0


def _calibrate_ranks(args: argparse.Namespace, job: _Job, plan: Any) -> int:
    """``calibrate --ranks N``: the whole plan under torchrun, against its predictions."""
    from fxshard.calibrate_dist import check_ranks, compare_run, run_plan

    check_ranks(plan, args.ranks, save_factors=args.save_factors, png=args.png, device=args.device)
    with progress(f"running {plan.model.name}'s plan on {args.ranks} ranks under torchrun"):
        run = run_plan(args.model, plan, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                       warmup=args.warmup, threads=args.threads or 1, profile_in_ranks=args.profile_in_ranks)
        report = compare_run(run, job.captured, model=job.built.name, profiled=not args.no_profiled)
    for dest, text in ((args.json, report.to_json()), (args.md, report.to_markdown())):
        if dest:
            with _output(dest) as f:
                f.write(text + "\n")
    if args.json != "-":
        console().print(report.to_markdown())
    wrote("the report as JSON", args.json)
    wrote("the report as markdown", args.md)
    return 0

def cmd_simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fxshard import viz
    from fxshard.plan import Plan
    from fxshard.simulate import to_chrome_trace
    from fxshard.simulate_plan import simulate_plan
    from fxshard.viz_text import simulation_text

    if args.schedule is not None:
        check_names(schedule=args.schedule)
    try:
        text = Path(args.plan).read_text(encoding="utf-8")
    except OSError as e:
        raise ZooError(f"cannot read plan file {args.plan!r}: {e.strerror}; write one with "
                       f"'fxshard plan MODEL --devices SPEC --json {args.plan}'") from e
    plan = Plan.from_json(text)
    result = simulate_plan(plan, schedule=args.schedule, microbatches=args.microbatches)
    what = simulation_text(plan, result)
    samples = plan.batch_size / result.step_time_s if result.step_time_s else 0.0
    out = console()
    out.print(f"{plan.model.name}: {what}: step {fmt_time(result.step_time_s)}, bubble "
                  f"{result.bubble_fraction:.1%}, {samples:,.1f} samples/s (planned: "
                  f"{fmt_time(plan.estimate.step_time_s)} with {plan.schedule or 'no pipeline schedule'}, "
                  f"{plan.microbatches} micro-batch(es))")
    for rank, (busy, idle) in enumerate(zip(result.busy_s, result.idle_s)):
        who = "each device" if plan.strategy in ("single", "ddp", "fsdp") else f"rank {rank}"
        out.print(f"  {who}: busy {fmt_time(busy)}, idle {fmt_time(idle)}")
    if args.png:
        viz.timeline_png(result, args.png, title=f"{plan.model.name}: {what}")
        wrote("the timeline", args.png)
    if args.trace:
        with _output(args.trace) as f:
            f.write(to_chrome_trace(result, title=f"{plan.model.name}: {what}"))
        wrote("the Chrome trace", args.trace)
    return 0


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


_COMMANDS = {"devices": cmd_devices, "inspect": cmd_inspect, "plan": cmd_plan, "compare": cmd_compare,
             "export": cmd_export, "calibrate": cmd_calibrate, "simulate": cmd_simulate}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser(_COMMANDS)
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
        print(f"fxshard {args.command}: error: {cli_words(str(e))}", file=sys.stderr)
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
