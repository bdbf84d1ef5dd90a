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

from fxshard.errors import DeviceSpecError, FxshardError, ZooError

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
# Entry point
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxshard", description="Automatic model-parallel compiler for PyTorch: inspect models and devices.")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len", "top"):
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
    except KeyboardInterrupt:
        print("fxshard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
