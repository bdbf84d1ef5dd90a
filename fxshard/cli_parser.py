"""The ``fxshard`` command line's arguments: one argparse sub-parser per command.

The commands themselves are in fxshard/cli.py, which hands them to :func:`build_parser`; each
sub-parser's arguments are added by one small function here, the arguments the model commands
share (plan, compare, export, calibrate) once in :func:`_model_args`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence

from fxshard.errors import UsageError

__all__ = ["build_parser", "check_names"]

Command = Callable[[argparse.Namespace], int]


def _version() -> str:
    import torch

    import fxshard

    return f"fxshard {fxshard.__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"


def _json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", metavar="FILE", help=f"write {what} as JSON ('-' for stdout)")


def _size_args(p: argparse.ArgumentParser) -> None:
    """The example inputs' batch size and sequence length."""
    p.add_argument("--batch-size", type=int, metavar="N", help="batch size of the example inputs")
    p.add_argument("--seq-len", type=int, metavar="N", help="sequence length for language models")


def _devices_args(p: argparse.ArgumentParser) -> None:
    _json_arg(p, "presets, links and this machine")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="a built-in model name (see 'fxshard inspect --help') or path/file.py:factory or pkg.mod:factory")
    p.add_argument("--device", default="H100-80GB", metavar="PRESET", help="device preset to price on (default H100-80GB)")
    _size_args(p)
    p.add_argument("--cost-model", default="analytical", metavar="NAME",
                   help="how node times are estimated: analytical (default), profiled, or any registered name")
    p.add_argument("--method", default="auto", choices=("auto", "symbolic_trace", "export"),
                   help="capture method (default: symbolic_trace, then torch.export)")
    p.add_argument("--top", type=int, metavar="N", help="show only the N most expensive nodes")
    _json_arg(p, "the rows and totals")


def _model_args(p: argparse.ArgumentParser) -> None:
    """The model, cluster and planning options every planning command takes."""
    p.add_argument("model", metavar="MODEL", help="a built-in model name or path/file.py:factory or pkg.mod:factory")
    p.add_argument("--devices", required=True, metavar="SPEC",
                   help="the cluster: 8, 8xA100-80GB, 2x8xH100-80GB, 4xcpu:2GB, or a comma-free device list")
    _size_args(p)
    p.add_argument("--partitioner", default="metis", metavar="NAME", help="partitioner (default metis)")
    p.add_argument("--schedule", metavar="NAME", help="gpipe, 1f1b, interleaved1f1b, zbv, ... in any case, or "
                                                        "torch's names such as Interleaved1F1B (default: auto)")
    p.add_argument("--microbatches", type=int, metavar="M", help="micro-batches per step (default: auto)")
    p.add_argument("--strategy", choices=("single", "ddp", "fsdp", "pipeline", "hybrid"), help="force a strategy")
    p.add_argument("--activation-checkpointing", choices=("none", "selective", "full"),
                   help="recompute activations in backward on every stage: none, selective (keep matmul and "
                        "attention outputs) or full (keep each repeated block's input) (default: auto)")
    p.add_argument("--data-parallel", choices=("ddp", "fsdp"),
                   help="how data-parallel groups hold the model: ddp (replicas) or fsdp (parameters, gradients "
                        "and optimizer state sharded) (default: auto)")
    p.add_argument("--stages", type=int, metavar="K", help="force the pipeline depth (default: auto)")
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd", "none"),
                   help="optimizer state per parameter (default adam)")
    p.add_argument("--cost-model", default="analytical", metavar="NAME",
                   help="analytical (default), profiled, or any registered cost model")
    p.add_argument("--factors", metavar="FILE",
                   help="price the device presets FILE names with the roofline factors 'fxshard calibrate "
                        "--save-factors FILE' fitted (the analytical cost model; other presets keep theirs)")
    p.add_argument("--inference", action="store_true", help="plan forward only (no gradients or optimizer)")
    p.add_argument("--exhaustive", action="store_true",
                   help="partition and simulate every pipeline candidate instead of skipping those whose lower "
                        "bound cannot beat the best found (same plan, slower; a reference)")


def _plan_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _json_arg(p, "the plan")
    p.add_argument("--png", metavar="FILE", help="stage bars and the simulated schedule timeline")
    p.add_argument("--dot", metavar="FILE", help="the stage-coloured graph, modules collapsed (Graphviz)")


def _compare_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--partitioners", metavar="A,B,C",
                   help="comma-separated names (default: every registered one but the exact milp, which runs "
                        "only when named)")
    _json_arg(p, "the rows")


def _export_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write into")


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--device", metavar="DEVICE", help="torch device to measure on (default: cuda if present, else cpu)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed runs per measurement (median kept)")
    p.add_argument("--no-profiled", action="store_true", help="skip the profiled cost model (faster)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads to measure and profile with (default: the current count; 1 is steadiest)")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="run the whole plan under torchrun on N gloo ranks of this machine (N = the plan's devices) "
                        "and compare its stages, step and per-rank peak memory with the predictions")
    p.add_argument("--steps", type=int, default=5, metavar="N", help="with --ranks: timed training steps (median kept)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="with --ranks: untimed steps first (at least 1)")
    p.add_argument("--profile-in-ranks", action="store_true",
                   help="with --ranks: each rank measures the profiled cost model right after its timed steps, and "
                        "each stage is held against its own rank's profile (a shared machine's drift left out)")
    p.add_argument("--save-factors", metavar="FILE",
                   help="write the fitted roofline factors to FILE (added to FILE's other presets if it exists), "
                        "for plan/compare/export --factors FILE")
    _json_arg(p, "the report")
    p.add_argument("--md", metavar="FILE", help="write the report as a markdown table")
    p.add_argument("--png", metavar="FILE", help="predicted against measured stage times")


def _simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", metavar="PLAN.json")
    p.add_argument("--schedule", metavar="NAME", help="simulate with this schedule instead")
    p.add_argument("--microbatches", type=int, metavar="M", help="simulate with this many micro-batches")
    p.add_argument("--png", metavar="FILE", help="the timeline, one row per rank")
    p.add_argument("--trace", metavar="FILE", help="Chrome trace JSON (chrome://tracing, Perfetto)")


# Each command's name, help line and arguments, in the order ``fxshard --help`` lists them.
_SUBCOMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None]], ...] = (
    ("devices", "the device presets and their figures", _devices_args),
    ("inspect", "the captured graph, one row per node, with its costs", _inspect_args),
    ("plan", "plan a model on a cluster: stages, strategy, schedule, estimate", _plan_args),
    ("compare", "the best plan per partitioner, beside single, ddp and fsdp, side by side", _compare_args),
    ("export", "stage sources, plan.json, a torchrun launcher, split specs", _export_args),
    ("calibrate", "run the plan's stages on this machine and compare with predictions", _calibrate_args),
    ("simulate", "what-if on a saved plan: another schedule or micro-batch count", _simulate_args),
)


def build_parser(commands: Mapping[str, Command]) -> argparse.ArgumentParser:
    """The ``fxshard`` parser; each sub-command's namespace carries ``func``, its entry in ``commands``.

    Args:
        commands: command name -> the function that runs it (fxshard/cli.py's ``cmd_*``).
    """
    parser = argparse.ArgumentParser(
        prog="fxshard", description="Automatic model-parallel compiler for PyTorch: plan, compare, export and "
                                    "simulate model-parallel training; inspect models and devices.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_args in _SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=commands[name])
    return parser


def check_names(*, partitioners: Sequence[str] = (), schedule: str | None = None,
                cost_model: str | None = None) -> None:
    """Refuse names nothing is registered under, as bad usage (exit 2). Called after the model
    is resolved, so partitioners and cost models a factory file registers count."""
    from fxshard.cost_models import cost_models
    from fxshard.passes.partition import partitioners as registered
    from fxshard.simulate import SCHEDULES, SimulationError, schedule_name

    unknown = [n for n in partitioners if n not in registered()]
    if unknown:
        raise UsageError(f"unknown partitioner(s) {', '.join(map(repr, unknown))}; registered: "
                         f"{', '.join(registered())} (register your own with fxshard.register_partitioner in the "
                         f"model's factory file)")
    if schedule is not None:
        try:
            schedule_name(schedule)
        except SimulationError as e:
            raise UsageError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)} (torch's names, "
                             f"such as Interleaved1F1B, work too, in any case)") from e
    if cost_model is not None and cost_model not in cost_models():
        raise UsageError(f"unknown cost model {cost_model!r}; registered: {', '.join(cost_models())} (register "
                         f"your own with fxshard.register_cost_model in the model's factory file)")
