"""Refit the analytical model's factors from a committed GPU run, on any machine (no GPU needed).

    python benchmarks/gpu_refit.py docs/gpu/h200-torch2.11-steps/summary.json --md refit.md

A run of ``gpu_calibration.py`` keeps, per model, every node's isolated forward and backward time
(the "kernels" rows) and every stage's measured forward and backward time. This script rebuilds
the same four models on the meta device (same configs, bf16, same 4-stage 1F1B plan: the node
counts per stage are checked against the run's), and asks two questions of the data:

1. **Per-node fit** (``fit_factors`` on the kernel rows of all four models pooled): do factors
   fitted to isolated nodes predict the stages? For each model, its stages priced with the
   pooled fit and with a fit that leaves that model out.
2. **Stage-level fit of the per-kernel overhead** (efficiencies kept at the preset's): the
   ``launch_overhead_s`` that minimises the median |log error| of the other three models'
   stage forward and backward times, tested on the model left out.

Every figure it prints is an error on data the factors were not fitted to (leave one model out),
except the "pooled" columns, which say so. Nothing is written into ``analytical.FACTORS``: the
result is for docs/gpu/README.md, which says what it shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_calibration import MICROBATCHES, STAGES, _models  # noqa: E402

import fxshard  # noqa: E402
from fxshard.capture import capture  # noqa: E402
from fxshard.cluster import Cluster  # noqa: E402
from fxshard.cost_models import NodeTime, estimate, scale_batch  # noqa: E402
from fxshard.cost_models.analysis import analyze  # noqa: E402
from fxshard.cost_models.analytical import AnalyticalCostModel, RooflineFactors, factors_for, fit_factors  # noqa: E402
from fxshard.passes.stages import summarize_stages  # noqa: E402

_OVERHEADS = np.geomspace(1e-6, 1e-4, 81)


@dataclasses.dataclass
class _Model:
    captured: Any
    plan: Any
    works: list          # the kernel rows' node works, at the captured batch
    times: list          # their measured NodeTimes
    micro: list          # every node's work at the plan's micro-batch
    rows: list           # the run's measured stage rows


def _load(summary: dict, spec_name: str) -> dict[str, _Model]:
    devices = Cluster.parse(f"{STAGES}x{spec_name}")
    out = {}
    for name, make in _models(False, torch.device("meta")).items():
        run = summary["models"].get(name)
        if not run or "none" not in run.get("variants", {}) or "kernels" not in run["variants"]["none"]:
            continue
        model, inputs, _ = make()
        plan = fxshard.plan(model, devices, inputs, strategy="pipeline", stages=STAGES, schedule="1f1b",
                            microbatches=MICROBATCHES, name=name)
        counts = [len(s.nodes) for s in plan.stages]
        if counts != run["plan"]["stage_nodes"]:
            raise SystemExit(f"{name}: this checkout plans stages of {counts} nodes, the run had "
                             f"{run['plan']['stage_nodes']}: refit with the run's commit")
        captured = capture(model, inputs)
        full = analyze(captured)
        by_name = {w.name: w for w in full}
        kernels = run["variants"]["none"]["kernels"]
        out[name] = _Model(captured=captured, plan=plan, works=[by_name[k["name"]] for k in kernels],
                           times=[NodeTime(fwd_s=k["fwd_s"], bwd_s=k["bwd_s"]) for k in kernels],
                           micro=scale_batch(full, 1.0 / MICROBATCHES),
                           rows=[r for r in run["variants"]["none"]["stage_rows"] if r["stage"] >= 0])
    return out


def _stage_times(m: _Model, spec: Any, factors: RooflineFactors) -> list[tuple[float, float]]:
    costs = estimate(m.captured, spec, works=m.micro, cost_model=AnalyticalCostModel(factors=factors))
    stages = summarize_stages(m.captured, costs, m.plan.stage_of(), m.plan.num_stages, training=True,
                              optimizer="adam")
    return [(s.fwd_time_s, s.bwd_time_s) for s in stages]


def _stage_error(m: _Model, spec: Any, factors: RooflineFactors) -> float:
    """Median |predicted - measured| / measured over the model's stages, fwd+bwd."""
    pairs = zip(_stage_times(m, spec, factors), m.rows)
    return statistics.median(abs(f + b - r["measured_fwd_s"] - r["measured_bwd_s"])
                             / (r["measured_fwd_s"] + r["measured_bwd_s"]) for (f, b), r in pairs)


def _log_error(models: list[_Model], spec: Any, factors: RooflineFactors) -> float:
    errors = []
    for m in models:
        for (f, b), r in zip(_stage_times(m, spec, factors), m.rows):
            errors += [abs(np.log(f / r["measured_fwd_s"])), abs(np.log(b / r["measured_bwd_s"]))]
    return float(np.median(errors))


def _node_fit(models: list[_Model], spec: Any) -> RooflineFactors:
    return fit_factors([w for m in models for w in m.works], [t for m in models for t in m.times], spec).factors


def _overhead_fit(models: list[_Model], spec: Any, base: RooflineFactors) -> RooflineFactors:
    best = min(_OVERHEADS, key=lambda o: _log_error(models, spec, dataclasses.replace(base, launch_overhead_s=float(o))))
    return dataclasses.replace(base, launch_overhead_s=float(best))


def refit(summary: dict) -> list[str]:
    """The markdown report: per model, the stage error with the preset's factors and each refit."""
    spec = Cluster.parse(f"1x{summary['spec']}").devices[0].spec
    models = _load(summary, spec.name)
    current = factors_for(spec)
    pooled = _node_fit(list(models.values()), spec)
    stage_all = _overhead_fit(list(models.values()), spec, current)
    lines = [f"Run: {summary['spec']}, torch {summary['torch']}. Preset factors: matmul_eff {current.matmul_eff}, "
             f"memory_eff {current.memory_eff}, launch_overhead_s {current.launch_overhead_s:.2g}. "
             f"Per-node fit, all models pooled: matmul_eff {pooled.matmul_eff:.2f}, memory_eff "
             f"{pooled.memory_eff:.2f}, launch_overhead_s {pooled.launch_overhead_s:.2g}. Stage-level overhead, "
             f"all models pooled: {stage_all.launch_overhead_s * 1e6:.1f} us.", "",
             "| model | preset | per-node fit, pooled | per-node fit, model left out | stage-level overhead, "
             "model left out (fitted us) | stage-level overhead, pooled |", "|---|---|---|---|---|---|"]
    for name, m in models.items():
        others = [o for n, o in models.items() if n != name]
        node_loo = _node_fit(others, spec)
        stage_loo = _overhead_fit(others, spec, current)
        lines.append(f"| {name} | {_stage_error(m, spec, current):.1%} | {_stage_error(m, spec, pooled):.1%} | "
                     f"{_stage_error(m, spec, node_loo):.1%} | {_stage_error(m, spec, stage_loo):.1%} "
                     f"({stage_loo.launch_overhead_s * 1e6:.1f}) | {_stage_error(m, spec, stage_all):.1%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("summary", type=Path, help="a gpu_calibration.py summary.json with kernel rows")
    p.add_argument("--md", type=Path, help="also write the markdown here")
    args = p.parse_args(argv)
    lines = refit(json.loads(args.summary.read_text()))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
