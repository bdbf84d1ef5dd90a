"""The payoff of automation, and the torchrun pipeline's runtime overhead (CPU, gloo).

    python benchmarks/pipeline_payoff.py [--quick] [--ranks 2 4] [--models gpt2 llama resnet]
                                         [--steps 5] [--warmup 2] [--schedule 1f1b] [--microbatches 4]
                                         [--md F] [--json F]

For each model and rank count, one gloo job (one torch thread per rank) runs, interleaved after
warmup, each side's training step (forward + backward + optimizer step):

- **fxshard**: ``fxshard.plan(..., strategy="pipeline", stages=N)`` with the default
  partitioner, run by ``fxshard.CompiledModel(..., plan=plan)``;
- **upstream**: ``torch.distributed.pipelining.pipeline()`` split at equal block counts
  (``SplitPoint.BEGINNING`` at ``h.4`` for 8 blocks on 2 ranks), ``pipe.build_stage``;
- **hand** (GPT-2 and LLaMA): a hand-written ``PipelineStage`` per rank, built from the model's
  own submodules with fxshard's split translated to pieces (embedding, blocks, norm, head),
  next to fxshard running that very split (``fxshard-same``) when its own split cuts inside a
  piece.

All sides use the same schedule class, micro-batches, loss and Adam; a tied embedding and head
held by two ranks has its gradient summed over them on every side (fxshard does it itself; a
correct upstream or hand-written pipeline must add it). fxshard's predicted step time is given
for its own plan and for the equal split (a plan from that explicit assignment, through a
registered partitioner), so the table shows whether fxshard predicted the gap it measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _payoff_worker as w
import torch
from _suite import machine

import fxshard
from fxshard.capture import capture

_SPLIT_NAME = "_payoff_explicit_split"


def explicit_plan(model, x, devices: str, node_stage: dict[str, int], **options) -> fxshard.Plan:
    """fxshard's plan for a given node -> stage assignment (a partitioner that returns it)."""
    fxshard.register_partitioner(_SPLIT_NAME, lambda problem, seed=0: {n: node_stage[n] for n in problem.nodes})
    try:
        return fxshard.plan(model, devices, (x,), partitioner=_SPLIT_NAME, **options)
    finally:
        fxshard.unregister_partitioner(_SPLIT_NAME)


def upstream_refusal(model, x, microbatches: int, starts: list[str]) -> str | None:
    """Why upstream ``pipeline()`` cannot train this split, or None: torch 2.13's stages refuse
    a value sent to a non-adjacent stage ("Backward of skip connections not supported yet")."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    pipe = pipeline(model, mb_args=(x[: x.shape[0] // microbatches],),
                    split_spec={p: SplitPoint.BEGINNING for p in starts})
    stage = {n: i for i, n in enumerate(n for n in pipe.split_gm.graph.nodes if n.op == "call_module")}
    for node, i in stage.items():
        users = [u for g in node.users for u in ([g] if g in stage else g.users)]
        far = sorted({stage[u] for u in users if u in stage and stage[u] > i + 1})
        if far:
            return (f"stage {i} sends a value to stage {far[0]} (not its neighbour); torch "
                    f"{torch.__version__} pipelining: 'Backward of skip connections not supported yet'")
    return None


def translate(plan: fxshard.Plan, pieces: dict[str, str], order: list[str]) -> tuple[list[str] | None, bool]:
    """fxshard's split in pieces: the pieces stages 1.. begin at (None if it has fewer pieces than
    stages), and whether every piece lies wholly in one stage."""
    stage_of = plan.stage_of()
    votes: dict[str, list[int]] = {p: [] for p in order}
    for node, piece in pieces.items():
        votes[piece].append(stage_of[node])
    aligned = all(len(set(v)) == 1 for v in votes.values())
    staged, top = {}, 0
    for p in order:  # majority stage, kept monotone
        v = votes[p]
        top = max(top, max(set(v), key=lambda s: (v.count(s), -s)))
        staged[p] = top
    starts = [next(p for p in order if staged[p] == s) for s in range(1, plan.num_stages)
              if any(staged[p] == s for p in order)]
    return (starts if len(starts) == plan.num_stages - 1 else None), aligned


def split_text(order: list[str], starts: list[str]) -> str:
    stage = w.stage_of_pieces(order, starts)
    parts = []
    for s in range(len(starts) + 1):
        mine = [p for p in order if stage[p] == s]
        parts.append(mine[0] if len(mine) == 1 else f"{mine[0]}..{mine[-1]}")
    return " \\| ".join(parts)


def run_model(name: str, world: int, args: argparse.Namespace) -> dict:
    mc = w.case(name, args.quick)
    model, x, target = mc.build()
    devices = f"{world}xcpu:16GB"
    # the loss every side trains with, priced on fxshard's last stage
    options = {"strategy": "pipeline", "stages": world, "schedule": args.schedule, "microbatches": args.microbatches,
               "activation_checkpointing": "none", "loss_fn": mc.loss, "example_target": target}
    captured = capture(model, (x,))
    pieces = w.pieces_of(captured.gm, mc)
    order = w.piece_order(pieces)
    fx_plan = fxshard.plan(model, devices, (x,), **options)
    equal = w.equal_split(order, mc.blocks, world)
    by_piece = w.stage_of_pieces(order, equal)
    eq_plan = explicit_plan(model, x, devices, {n: by_piece[p] for n, p in pieces.items()}, **options)
    fx_starts, aligned = translate(fx_plan, pieces, order)
    # fxshard-equal: fxshard's runtime on the user's split, telling the split's payoff from the runtimes'.
    refusal = upstream_refusal(model, x, args.microbatches, equal)
    sides: list[tuple[str, str, object]] = [("fxshard", "fxshard", fx_plan.to_json())]
    sides += [("upstream", "upstream", equal)] if refusal is None else []
    sides += [("fxshard-equal", "fxshard", eq_plan.to_json())]
    same_plan = fx_plan
    if mc.hand and fx_starts is not None and not args.no_hand:
        if not aligned:
            by_piece = w.stage_of_pieces(order, fx_starts)
            same_plan = explicit_plan(model, x, devices, {n: by_piece[p] for n, p in pieces.items()}, **options)
            sides.append(("fxshard-same", "fxshard", same_plan.to_json()))
        sides.append(("hand", "hand", (tuple(order), tuple(fx_starts))))
    job = w.Job(model=name, quick=args.quick, world=world, schedule=args.schedule, microbatches=args.microbatches,
                steps=args.steps, warmup=args.warmup, devices=devices, sides=tuple(sides))
    ranks = w.run_job(job, timeout_s=args.timeout)
    measured = {}
    for label, _, _ in sides:
        walls = [max(r[label]["wall"][i] for r in ranks) for i in range(args.steps)]
        cpus = [max(r[label]["cpu"][i] for r in ranks) for i in range(args.steps)]
        busy = max(sum(r[label]["cpu"]) / sum(r[label]["wall"]) for r in ranks)
        measured[label] = {"step_s": w.median(walls), "steps_s": walls, "busiest_cpu_per_wall": busy,
                           "cpu_s": w.median(cpus), "rank_cpu_s": [w.median(r[label]["cpu"]) for r in ranks]}
    return {
        "model": name, "ranks": world, "oversubscribed": world > _cores(), "schedule": args.schedule,
        "microbatches": args.microbatches, "batch": int(x.shape[0]),
        "params": sum(p.numel() for p in model.parameters()),
        "fxshard_split": _plan_text(fx_plan, order, fx_starts, aligned), "equal_split": split_text(order, equal),
        "hand_split": split_text(order, fx_starts) if fx_starts else None, "fxshard_split_aligned": aligned,
        "predicted": {"fxshard": fx_plan.estimate.step_time_s, "upstream": eq_plan.estimate.step_time_s,
                      "fxshard-same": same_plan.estimate.step_time_s},
        "measured": measured, "upstream_refused": refusal,
    }


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _plan_text(plan: fxshard.Plan, order: list[str], starts: list[str] | None, aligned: bool) -> str:
    if starts is not None and aligned:
        return split_text(order, starts)
    sizes = "/".join(str(len(s.nodes)) for s in plan.stages)
    near = f", ~ {split_text(order, starts)}" if starts else ""
    return f"nodes {sizes}{near}"


def _cpus(side: dict) -> str:
    return ", ".join(f"{c:.3f}" for c in side["rank_cpu_s"])


def _paired(a: dict, b: dict) -> float:
    """Median over the interleaved rounds of a's step time over b's (load drift cancels in a pair)."""
    return w.median([x / y for x, y in zip(a["steps_s"], b["steps_s"]) if y > 0])


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def tables(rows: list[dict], args: argparse.Namespace) -> str:
    out = [(f"Machine: {machine()}; one torch thread per rank, gloo; schedule {args.schedule}, "
           f"{args.microbatches} micro-batches, Adam; median of {args.steps} interleaved steps after "
           f"{args.warmup} warmup steps each (step = forward + backward + optimizer step, the slowest rank, "
           f"between barriers)."), "",
           "### fxshard's plan against upstream `pipeline()` split at equal block counts", "",
           ("| model | ranks | fxshard split | equal split | fxshard (s) | upstream (s) | ratio | paired ratio | "
           "bottleneck CPU ratio | fxshard on the equal split (s) | split's payoff (paired) | "
           "split's payoff (bottleneck CPU) | predicted fxshard (s) | predicted equal (s) | predicted ratio | "
           "busiest rank cpu/wall fx, up |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, p = r["measured"], r["predicted"]
        over = " (oversubscribed)" if r["oversubscribed"] else ""
        fx, up, eq = m["fxshard"], m.get("upstream"), m["fxshard-equal"]
        up_cells = (f"{up['step_s']:.3f} | **{_ratio(fx['step_s'], up['step_s']):.2f}** | {_paired(fx, up):.2f} | "
                    f"{_ratio(max(fx['rank_cpu_s']), max(up['rank_cpu_s'])):.2f}" if up
                    else "fails (skip connection) | - | - | -")
        out.append(f"| {r['model']} | {r['ranks']}{over} | {r['fxshard_split']} | {r['equal_split']} | "
                   f"{fx['step_s']:.3f} | {up_cells} | {eq['step_s']:.3f} | {_paired(fx, eq):.2f} | "
                   f"{_ratio(max(fx['rank_cpu_s']), max(eq['rank_cpu_s'])):.2f} | {p['fxshard']:.3f} | "
                   f"{p['upstream']:.3f} | {_ratio(p['fxshard'], p['upstream']):.2f} | "
                   f"{fx['busiest_cpu_per_wall']:.2f}, {up['busiest_cpu_per_wall'] if up else float('nan'):.2f} |")
    out += [f"- {r['model']} on {r['ranks']} ranks: upstream refused: {r['upstream_refused']}"
            for r in rows if r.get("upstream_refused")]
    hand = [r for r in rows if "hand" in r["measured"]]
    if hand:
        out += ["", "### fxshard's torchrun pipeline against a hand-written `PipelineStage` pipeline, same split", "",
                ("| model | ranks | split | fxshard (s) | hand-written (s) | throughput fxshard / hand | paired | "
                "CPU s per step per rank, fxshard | hand-written | CPU ratio hand / fxshard | "
                "busiest rank cpu/wall fx, hand |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in hand:
            m = r["measured"]
            fx, hd = m.get("fxshard-same", m["fxshard"]), m["hand"]
            out.append(f"| {r['model']} | {r['ranks']} | {r['hand_split']} | {fx['step_s']:.3f} | "
                       f"{hd['step_s']:.3f} | **{_ratio(hd['step_s'], fx['step_s']):.3f}** | "
                       f"{_paired(hd, fx):.3f} | {_cpus(fx)} | {_cpus(hd)} | "
                       f"{_ratio(sum(hd['rank_cpu_s']), sum(fx['rank_cpu_s'])):.3f} | "
                       f"{fx['busiest_cpu_per_wall']:.2f}, {hd['busiest_cpu_per_wall']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, 2 ranks, 2 steps (the test's run)")
    ap.add_argument("--ranks", type=int, nargs="+")
    ap.add_argument("--models", nargs="+", choices=w.MODELS)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--no-hand", action="store_true", help="leave out the hand-written pipelines")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per job before its ranks are killed")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.ranks = args.ranks or ([2] if args.quick else [2, 4])
    args.models = args.models or list(w.MODELS)
    args.steps = args.steps or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    rows: list[dict] = []
    failed: list[dict] = []
    for name in args.models:
        for world in args.ranks:
            try:
                rows.append(run_model(name, world, args))
            except RuntimeError as e:  # a failed job is reported, the others still run
                failed.append({"model": name, "ranks": world, "error": str(e)})
                print(f"{name} on {world} ranks FAILED:\n{e}", flush=True)
                continue
            print(f"{name} on {world} ranks: " + ", ".join(f"{k} {v['step_s']:.3f} s"
                                                          for k, v in rows[-1]["measured"].items()), flush=True)
            _publish(rows, failed, args)  # after every job, so a long run's finished rows are kept
    print(tables(rows, args))
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed: " + ", ".join(f"{f['model']} on {f['ranks']} ranks"
                                                                      for f in failed))
    return rows


def _publish(rows: list[dict], failed: list[dict], args: argparse.Namespace) -> None:
    if args.md:
        args.md.write_text(tables(rows, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows, "failed": failed}, indent=2))


if __name__ == "__main__":
    main()
