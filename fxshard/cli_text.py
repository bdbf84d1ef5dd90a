"""What the command line prints and writes: option names as flags, numbers with units, plans and
comparisons as tables (rich), JSON documents, where an output went, a spinner while it works.

The library words its messages in Python (``optimizer='sgd'``); :func:`cli_words` turns them
into the flags a CLI user types (``--optimizer sgd``), from one table.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from fxshard.units import format_count as fmt_count
from fxshard.units import format_time as fmt_time

__all__ = ["cli_words", "compare_table", "console", "fmt_count", "fmt_time", "levers_words", "print_plan", "progress",
           "write_json", "wrote"]

# Python option name -> command-line flag, for messages the library words in Python
# ("optimizer='sgd'"): the CLI shows them as flags ("--optimizer sgd"). One table for every message.
_FLAGS = {"optimizer": "--optimizer", "microbatches": "--microbatches", "schedule": "--schedule",
          "partitioner": "--partitioner", "cost_model": "--cost-model", "strategy": "--strategy",
          "stages": "--stages", "batch_size": "--batch-size", "seq_len": "--seq-len",
          "activation_checkpointing": "--activation-checkpointing", "data_parallel": "--data-parallel",
          "factors": "--factors"}
_OPTION = re.compile(r"(?<![\w.-])(training|" + "|".join(_FLAGS) + r")(<=|>=|=)('[^']*'|\"[^\"]*\"|[\w.+-]+)?")


_TWICE = re.compile(r"(--[\w-]+(?: [\w.+-]+)?) \(\1\)")


def _flag_words(match: re.Match) -> str:
    name, op, value = match.group(1), match.group(2), match.group(3)
    if name == "training":
        return {"False": "--inference", "True": "no --inference"}.get(value or "", match.group(0))
    flag = _FLAGS[name]
    if value is None:  # "drop stages=": the flag itself
        return flag if op == "=" else match.group(0)
    value = value.strip("'\"")
    if value == "None":
        return f"no {flag}"
    return {"=": f"{flag} {value}", "<=": f"{flag} at most {value}", ">=": f"{flag} at least {value}"}[op]


def cli_words(text: str) -> str:
    """A library message with its Python option names as the CLI's flags: ``optimizer='sgd'``
    becomes ``--optimizer sgd``, ``strategy=None`` ``no --strategy``, ``training=False``
    ``--inference``."""
    # "training=False (--inference)", written for both audiences, says the flag once.
    return _TWICE.sub(r"\1", _OPTION.sub(_flag_words, text))


def console() -> Any:
    """A rich console on stdout."""
    from rich.console import Console

    # A fixed width off a terminal keeps piped output and tests readable.
    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=False)


def _alternative_shape(a: Any) -> tuple[str, str]:
    """("stages x replicas", devices) of an alternative, with the stages that share a device."""
    from fxshard.simulate import SCHEDULES

    per = SCHEDULES[a.schedule][1] if a.schedule in SCHEDULES and a.strategy in ("pipeline", "hybrid") else 1
    shape = f"{a.stages} x {a.replicas}" + (f" ({per} per device)" if per > 1 else "")
    return shape, str(a.stages * a.replicas // per) if a.fits else "-"


def print_plan(plan: Any, seconds: float, unforced: Any = None, forced: str | None = None) -> None:
    """Print a plan: its stages, estimate, why it won (with ``forced``, the flags that forced it,
    such as "--strategy fsdp", and ``unforced``, the plan picked without them: what forcing costs)
    and the alternatives."""
    from rich.table import Table

    from fxshard.cluster import format_bytes

    out = console()
    e = plan.estimate
    levers = plan.levers_text()
    accumulated = plan.strategy in ("ddp", "fsdp") and plan.microbatches > 1  # the levers say so
    title = (f"{plan.model.name}: {plan.strategy} ({plan.shape_text()})" + (f", {plan.schedule}" if plan.schedule else "")
             + ("" if accumulated else f", {plan.microbatches} micro-batch(es)") + (f", {levers}" if levers else ""))
    checkpointed = any(s.activation_checkpointing != "none" for s in plan.stages)
    per = plan.stages_per_device
    caption = (f"capacity: each device's memory shared by the {per} stages it holds ({plan.schedule} schedule)"
               if per > 1 else None)
    table = Table(title=title, caption=caption)
    for col, justify in (("stage", "right"), ("devices", "left"), ("first .. last", "left"), ("nodes", "right"),
                         ("params", "right"), ("peak / capacity", "right"), ("fwd", "right"), ("bwd", "right"),
                         ("sends", "right")) + ((("checkpointing", "left"),) if checkpointed else ()):
        table.add_column(col, justify=justify, overflow="fold")
    for s in plan.stages:
        share = s.peak_memory_bytes / s.memory_capacity_bytes if s.memory_capacity_bytes else 0.0
        span = f"{s.first_module or (s.nodes[0] if s.nodes else '')} .. {s.last_module or (s.nodes[-1] if s.nodes else '')}"
        devices = f"{','.join(map(str, s.device_indices))}: {'/'.join(sorted(set(s.devices)))}"
        table.add_row(str(s.index), devices, span, str(len(s.nodes)), format_bytes(s.param_bytes),
                      f"{format_bytes(s.peak_memory_bytes)} / {format_bytes(s.memory_capacity_bytes)} ({share:.0%})",
                      fmt_time(s.fwd_time_s), fmt_time(s.bwd_time_s), format_bytes(s.send_bytes),
                      *([s.activation_checkpointing] if checkpointed else []))
    out.print(table)
    out.print(f"estimate: step {fmt_time(e.step_time_s)}, bubble {e.bubble_fraction:.1%}, "
                  f"{e.samples_per_s:,.1f} samples/s (lower bound {fmt_time(e.lower_bound_step_time_s)}); "
                  f"batch {plan.batch_size}, {'training with ' + plan.optimizer if plan.training else 'inference'}")
    reason = cli_words(plan.reason)
    if forced is not None:
        reason += "; " + _against_unforced(plan, unforced, forced)
    if reason:
        out.print(f"why: {reason}")
    alts = Table(title="alternatives considered (best first)")
    for col in ("strategy", "stages x replicas", "devices", "schedule", "micro-batches", "levers", "samples/s",
                "peak memory", "fits"):
        alts.add_column(col)
    for a in plan.alternatives[:8]:
        shape, devices = _alternative_shape(a)
        alts.add_row(a.strategy, shape, devices, a.schedule or "-", str(a.microbatches),
                     levers_words(a.data_parallel, a.activation_checkpointing),
                     f"{a.samples_per_s:,.1f}" if a.fits else "-",
                     format_bytes(a.peak_memory_bytes) if a.peak_memory_bytes >= 0 else "-",
                     "yes" if a.fits else f"no: {cli_words(a.note)[:60]}")
    out.print(alts)
    out.print(f"planned in {seconds:.1f} s")


def levers_words(data_parallel: str | None, activation_checkpointing: str) -> str:
    """A candidate's memory levers, short for a table cell: "fsdp, full ckpt" (activation
    checkpointing), "ddp", "-"."""
    words = [data_parallel] if data_parallel else []
    if activation_checkpointing not in ("none", ""):
        words.append(f"{activation_checkpointing} ckpt")
    return ", ".join(words) or "-"


def _against_unforced(plan: Any, unforced: Any, forced: str) -> str:
    """How a plan forced by flags (``forced``: "--strategy fsdp --activation-checkpointing full")
    compares with the plan the planner picks without them."""
    if unforced is None:
        return f"without {forced} no other plan fits"

    def shape(p: Any) -> tuple:
        return (p.strategy, p.num_stages, p.replicas, p.schedule, p.microbatches, p.data_parallel,
                tuple(s.activation_checkpointing for s in p.stages))

    if shape(unforced) == shape(plan):
        return f"without {forced} the planner picks this same plan"
    rate, best = plan.estimate.samples_per_s, unforced.estimate.samples_per_s
    levers = unforced.levers_text()
    return (f"without {forced} the planner picks {unforced.strategy} ({unforced.shape_text()}"
            + (f", {unforced.schedule}" if unforced.schedule else "") + (f", {levers}" if levers else "")
            + f") at {best:,.1f} samples/s, "
            + (f"{best / rate:.2f}x this plan's {rate:,.1f}" if rate > 0 else "where this plan runs none"))


def compare_table(rows: list[dict[str, Any]], title: str) -> None:
    """Print the ``fxshard compare`` rows (:meth:`fxshard.compare.CompareRow.to_dict`)."""
    from rich.table import Table

    from fxshard.cluster import format_bytes

    table = Table(title=title)
    for col in ("partitioner", "plan", "levers", "devices", "step", "samples/s", "bottleneck stage", "lower bound",
                "cut / step", "max stage memory", "seconds"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["partitioner"], f"error: {r['error'][:70]}", *[""] * 9)
            continue
        shape = {"single": "", "ddp": f"x{r['replicas']}", "fsdp": f"x{r['replicas']}"}.get(
            r["strategy"], f"{r['stages']}x{r['replicas']}")
        shape += f" ({r['stages_per_device']} per device)" if r["stages_per_device"] > 1 else ""
        table.add_row(("* " if r["best"] else "") + (r["partitioner"] or "-"),
                      f"{r['strategy']} {shape} {r['schedule'] or ''} m={r['microbatches']}",
                      levers_words(r["data_parallel"], r["activation_checkpointing"]), str(r["devices"]),
                      fmt_time(r["step_time_s"]), f"{r['samples_per_s']:,.1f}", fmt_time(r["bottleneck_stage_time_s"]),
                      fmt_time(r["lower_bound_step_time_s"]), format_bytes(r["cut_bytes"]),
                      format_bytes(r["max_stage_memory_bytes"]), f"{r['plan_seconds']:.1f}")
    console().print(table)


def write_json(data: Any, dest: str) -> None:
    """``data`` as indented JSON to the file ``dest``, or to standard output for ``-``."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    if dest == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(dest, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def wrote(what: str, dest: str | None) -> None:
    """Say where an output file went (nothing for stdout, whose content speaks for itself)."""
    if dest and dest != "-":
        import os

        print(f"wrote {what} to {os.path.abspath(dest)}")


def progress(message: str) -> Any:
    """A spinner on a terminal's stderr for steps that take seconds; silent otherwise."""
    import contextlib

    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message)
