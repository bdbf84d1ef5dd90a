"""``fxshard devices`` and ``fxshard inspect``: the device presets, and one model's nodes priced.

The commands are registered in fxshard/cli.py with the others; tables are printed here with
fxshard/cli_text.py's helpers.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from fxshard.cli_parser import check_names
from fxshard.cli_text import console, fmt_count, fmt_time, progress, write_json, wrote

__all__ = ["cmd_devices", "cmd_inspect", "inspect_model"]


_FLOP_COLUMNS = ("float32", "tf32", "bfloat16", "float16", "float8")


def cmd_devices(args: argparse.Namespace) -> int:
    from fxshard.cluster import LINK_PRESETS, PRESETS, Cluster, format_bytes

    if args.json:
        write_json({"presets": {n: s.to_dict() for n, s in PRESETS.items()},
                    "links": {n: link.to_dict() for n, link in LINK_PRESETS.items()},
                    "local": Cluster.local().to_dict()}, args.json)
        if args.json == "-":
            return 0
    from rich.table import Table

    out = console()
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
                      *[fmt_count(flops[c], "FLOP/s") if c in flops else "-" for c in _FLOP_COLUMNS],
                      f"{spec.memory_bandwidth / 1e9:,.0f} GB/s")
    out.print(table)
    links = Table(title="Link presets")
    links.add_column("link")
    links.add_column("bandwidth", justify="right")
    links.add_column("latency", justify="right")
    for name, link in LINK_PRESETS.items():
        links.add_row(name, f"{link.bandwidth / 1e9:,.1f} GB/s", fmt_time(link.latency_s))
    out.print(links)
    out.print(f"This machine: {Cluster.local().describe()}")
    wrote("the presets as JSON", args.json)
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
    check_names(cost_model=cost_model)  # after resolve: a factory file may register plug-ins
    captured = capture(built.model, built.example_inputs, example_kwargs=built.example_kwargs, method=method)
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

    with progress(f"capturing and pricing {args.model}"):
        doc = inspect_model(args.model, device=args.device, batch_size=args.batch_size,
                            seq_len=args.seq_len, cost_model=args.cost_model, method=args.method)
    if args.json:
        write_json(doc, args.json)
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
        table.add_row(r["name"], r["op"], r["target"][:48], r["shape"], fmt_count(r["flops"]),
                      format_bytes(r["param_bytes"]) if r["param_bytes"] else "",
                      format_bytes(r["output_bytes"]) if r["output_bytes"] else "",
                      fmt_time(r["fwd_time_s"]), fmt_time(r["bwd_time_s"]))
    out = console()
    out.print(table)
    t = doc["totals"]
    out.print(
        f"parameters {format_bytes(t['param_bytes'])} (shared counted once), buffers "
        f"{format_bytes(t['buffer_bytes'])}, forward {fmt_count(t['fwd_flops'], 'FLOP')}, backward "
        f"{fmt_count(t['bwd_flops'], 'FLOP')}, activations saved for backward "
        f"{format_bytes(t['saved_activation_bytes'])}; time forward {fmt_time(t['fwd_time_s'])}, "
        f"backward {fmt_time(t['bwd_time_s'])}. Captured in {doc['seconds']['capture']:.2f} s, "
        f"priced in {doc['seconds']['cost']:.2f} s.")
    wrote("the rows and totals as JSON", args.json)
    return 0
