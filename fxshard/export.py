"""Export a plan: stage sources, plan.json, a torchrun launcher and upstream split specs.

``export_plan`` writes into one directory everything a user needs to read, review, and run
a plan outside fxshard's own CLI:

- ``stage_{i}.py``: each stage's fx-generated ``forward`` with a header (devices, values
  received and sent, tensors held), for reading;
- ``plan.json``: the plan (``Plan.from_json`` gives it back);
- ``train.py`` and ``launch.sh``: a torchrun training script that rebuilds the model, binds it
  to the plan with ``fxshard.CompiledModel(..., plan=plan)`` and trains with AdamW;
- ``split_spec.json``: the stage boundaries as ``torch.distributed.pipelining`` split points
  (module names, ``"BEGINNING"``) where a cut falls on a module boundary, and the cuts that
  do not;
- ``stages.json``: torchtitan-style module names per stage (``module_names_per_stage``);
- ``README.md``: what each file is and how to launch.

The analysis functions (:func:`split_points`, :func:`stage_modules`) are pure: graph and plan
in, JSON-able data out. Nothing here prints. See docs/runtime.md for how stages run.

Example::

    captured = fxshard.capture(model, (tokens,))
    plan = fxshard.plan(model, "4xA100-80GB", (tokens,))
    result = export_plan(captured, plan, "out/", model_ref="gpt2")
    print(result.launch_command)
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxshard import zoo
from fxshard.capture import CapturedGraph
from fxshard.errors import ExportError  # defined there, re-exported here
from fxshard.passes.split import StageGraph, split_graph
from fxshard.plan import Plan

__all__ = ["ExportError", "ExportResult", "export_plan", "split_points", "stage_modules"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What :func:`export_plan` wrote.

    Attributes:
        out_dir: the directory.
        files: every file written, in writing order.
        notes: things the user should know (cuts inside modules, multi-machine launch, ...).
        nproc: processes the plan runs on (its distinct devices).
        launch_command: how to start training with the plan.
    """

    out_dir: Path
    files: tuple[Path, ...]
    notes: tuple[str, ...]
    nproc: int
    launch_command: str


# ---------------------------------------------------------------------------------------
# Module membership, from node.meta["nn_module_stack"]
# ---------------------------------------------------------------------------------------

_SKIP_OPS = ("placeholder", "output", "get_attr")


def _clean_path(path: str) -> str:
    """A module-stack path as a plain FQN ("L['self'].layers[0]" -> "layers.0")."""
    path = path.removeprefix("L['self']").removeprefix("L__self__").lstrip(".")
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.lstrip(".")


def _module_paths(node: torch.fx.Node) -> tuple[str, ...]:
    """The module paths enclosing ``node``, outermost first (the root module excluded)."""
    paths: list[str] = []
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path = _clean_path(value[0] if isinstance(value, tuple) else str(value))
        if path and path not in paths:
            paths.append(path)
    if node.op == "call_module" and str(node.target) not in paths:
        paths.append(str(node.target))
    return tuple(paths)


def _compute_nodes(captured: CapturedGraph) -> list[torch.fx.Node]:
    """Nodes that compute, in graph order (inputs, outputs and attribute reads left out:
    attributes are replicated on every stage that reads them)."""
    return [n for n in captured.gm.graph.nodes if n.op not in _SKIP_OPS]


def _assignment(captured: CapturedGraph, plan: Plan) -> dict[str, int]:
    stage_of = plan.stage_of()
    missing = [n.name for n in _compute_nodes(captured) if n.name not in stage_of]
    if plan.model.fingerprint != captured.fingerprint() or missing:
        raise ExportError(
            f"the plan was made for {plan.model.name} (fingerprint {plan.model.fingerprint}, {plan.model.nodes} "
            f"nodes); this graph is {captured.model_name} (fingerprint {captured.fingerprint()}, "
            f"{len(captured.nodes)} nodes{', e.g. ' + repr(missing[0]) + ' has no stage' if missing else ''}). "
            f"Export the plan together with the graph it was made from")
    return stage_of


def _members(nodes: list[torch.fx.Node]) -> dict[str, list[int]]:
    """Module path -> positions (in ``nodes``) of the nodes inside it."""
    members: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for path in _module_paths(node):
            members.setdefault(path, []).append(i)
    return members


def split_points(captured: CapturedGraph, plan: Plan) -> dict[str, Any]:
    """The plan's stage boundaries as ``torch.distributed.pipelining`` split points.

    Upstream ``pipeline(model, ..., split_spec={"layers.8": SplitPoint.BEGINNING})`` cuts the
    graph order just before the named submodule's call: everything before goes to earlier
    stages, everything after to later ones. A boundary b (where stage b begins) is expressible
    that way when the plan's stages < b all come before stages >= b in graph order and the
    first node of stage b is the first node of a module whose nodes all lie in stages >= b;
    the outermost such module is named. Other boundaries go under ``not_on_module_boundary``
    with the nodes either side, so the user knows an upstream split would differ.

    Returns:
        ``{"split_spec": {fqn: "BEGINNING"}, "boundaries": [...], "not_on_module_boundary": [...]}``.
    """
    stage_of = _assignment(captured, plan)
    nodes = _compute_nodes(captured)
    stage = [stage_of[n.name] for n in nodes]
    members = _members(nodes)
    spec: dict[str, str] = {}
    boundaries, off = [], []
    for b in range(1, plan.num_stages):
        later = [i for i, s in enumerate(stage) if s >= b]
        earlier = [i for i, s in enumerate(stage) if s < b]
        entry: dict[str, Any] = {"stage": b, "first_module": plan.stages[b].first_module,
                                 "previous_last_module": plan.stages[b - 1].last_module}
        if not later or not earlier:
            off.append({**entry, "reason": f"stage {b} or every stage before it has no computing node"})
            continue
        first = later[0]
        entry.update(first_node=nodes[first].name, last_node_before=nodes[earlier[-1]].name)
        strays = [nodes[i].name for i in earlier if i > first]
        if strays:
            off.append({**entry, "reason": f"stages 0..{b - 1} are not all before stage {b} in graph order: "
                                           f"{len(strays)} node(s) of earlier stages come after {nodes[first].name}",
                        "out_of_order_nodes": strays[:20]})
            continue
        module = next((p for p in _module_paths(nodes[first]) if members[p][0] == first), None)
        if module is None:
            inside = _common_module(nodes[earlier[-1]], nodes[first])
            where = f"inside module {inside!r}" if inside else "outside any module"
            off.append({**entry, "inside_module": inside,
                        "reason": f"stage {b} begins at node {nodes[first].name!r}, {where}, which no submodule "
                                  f"begins with; an upstream split_spec cannot cut there"})
            continue
        spec[module] = "BEGINNING"
        boundaries.append({**entry, "module": module})
    return {"model": plan.model.name, "num_stages": plan.num_stages, "split_spec": spec,
            "boundaries": boundaries, "not_on_module_boundary": off}


def _common_module(a: torch.fx.Node, b: torch.fx.Node) -> str:
    """The innermost module enclosing both nodes, or ""."""
    common = ""
    for pa, pb in zip(_module_paths(a), _module_paths(b)):
        if pa != pb:
            break
        common = pa
    return common


def stage_modules(captured: CapturedGraph, plan: Plan) -> dict[str, Any]:
    """Torchtitan-style module names per stage.

    For each stage, the outermost module FQNs whose every node lies in that stage, in graph
    order; the computing nodes no such module covers (top-level ops, the parts of a block that
    a cut splits); and the attributes (parameters, buffers) the stage reads directly. A module
    is named by at most one stage.

    Returns:
        ``{"module_names_per_stage": [[fqn, ...], ...], "stages": [{...}, ...]}``.
    """
    stage_of = _assignment(captured, plan)
    nodes = _compute_nodes(captured)
    members = _members(nodes)
    stages_of_module = {p: {stage_of[nodes[i].name] for i in idx} for p, idx in members.items()}
    names: list[list[str]] = [[] for _ in range(plan.num_stages)]
    uncovered: list[list[str]] = [[] for _ in range(plan.num_stages)]
    for node in nodes:
        s = stage_of[node.name]
        module = next((p for p in _module_paths(node) if stages_of_module[p] == {s}), None)
        if module is None:
            uncovered[s].append(node.name)
        elif module not in names[s]:
            names[s].append(module)
    attributes: list[list[str]] = [[] for _ in range(plan.num_stages)]
    for node in captured.gm.graph.nodes:
        if node.op == "get_attr":
            for s in sorted({stage_of[u.name] for u in node.users if u.name in stage_of}):
                if str(node.target) not in attributes[s]:
                    attributes[s].append(str(node.target))
    stages = [{"index": st.index, "devices": list(st.devices), "modules": names[st.index],
               "uncovered_nodes": uncovered[st.index], "attributes": attributes[st.index],
               "first_module": st.first_module, "last_module": st.last_module} for st in plan.stages]
    return {"model": plan.model.name, "num_stages": plan.num_stages, "module_names_per_stage": names,
            "stages": stages}


# ---------------------------------------------------------------------------------------
# Stage sources
# ---------------------------------------------------------------------------------------


def _comment(label: str, items: list[str] | tuple[str, ...]) -> list[str]:
    text = f"{label}: " + (", ".join(items) if items else "(none)")
    return textwrap.wrap(_one_line(text), width=96, initial_indent="# ", subsequent_indent="#     ",
                         break_on_hyphens=False) or ["#"]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _held(captured: CapturedGraph, stage: StageGraph) -> tuple[list[str], list[str]]:
    """(parameter names, buffer names) the stage holds, under the model's own names."""

    def canonical(named: Any) -> list[str]:
        out: list[str] = []
        for name, t in named:
            name = captured.param_names.get(id(t), name)
            if name not in out:
                out.append(name)
        return out

    module = stage.module
    return (canonical(module.named_parameters(remove_duplicate=False)),
            canonical(module.named_buffers(remove_duplicate=False)))


def _stage_source(captured: CapturedGraph, plan: Plan, stage: StageGraph) -> str:
    st = plan.stages[stage.index]
    params, buffers = _held(captured, stage)
    lines = [(f"# fxshard export: stage {stage.index} of {plan.num_stages} of {_one_line(plan.model.name)} "
              f"(graph fingerprint {plan.model.fingerprint}, {plan.strategy} plan)")]
    lines += _comment("devices", list(st.devices))
    lines += _comment(f"{len(st.nodes)} nodes, modules", [f"first {st.first_module or '-'}",
                                                            f"last {st.last_module or '-'}"])
    lines += _comment(f"receives ({stage.num_input_tensors} tensor(s)), by producer node", list(stage.inputs))
    lines += _comment(f"sends ({stage.num_output_tensors} tensor(s)), by producer node", list(stage.outputs))
    lines += _comment(f"parameters held ({len(params)})", params)
    lines += _comment(f"buffers held ({len(buffers)})", buffers)
    lines += [
        "#",
        "# This is the stage's fx-generated forward(), for reading and review; it does not run on its",
        "# own: `self.<dotted.name>` refers to the stage module's submodules and tensors (the model's",
        "# own, under their original names), `_fxshard_repack_*` / `_fxshard_unpack_*` are fxshard's",
        "# helpers that turn non-tensor boundary values into tensors and back, and torch names are",
        "# the stage module's globals. To run the plan, use train.py (fxshard.CompiledModel with",
        "# plan=plan.json), which rebuilds every stage from the model.",
    ]
    return "\n".join(lines) + "\n" + stage.module.code.strip() + "\n"


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------


def _process_layout(plan: Plan) -> tuple[int, int, int]:
    """(processes, machines, processes per machine) the plan runs on."""
    used = sorted({d for s in plan.stages for d in s.device_indices})
    machine_of = {d.get("index"): d.get("machine", 0) for d in plan.cluster.get("devices", ())}
    per_machine: dict[int, int] = {}
    for d in used:
        m = machine_of.get(d, 0)
        per_machine[m] = per_machine.get(m, 0) + 1
    return len(used), max(len(per_machine), 1), max(per_machine.values(), default=1)


def _loss_kind(captured: CapturedGraph) -> str:
    """"lm" when the first input is (batch, seq) token ids and the first output is
    (batch, seq, vocab) logits; "mse" otherwise."""
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in reversed(captured.gm.graph.nodes) if n.op == "output")
    outs = [n.meta.get("val") for n in pytree.tree_leaves(output.args[0]) if isinstance(n, torch.fx.Node)]
    tokens = placeholders[0].meta.get("val") if placeholders else None
    logits = outs[0] if outs else None
    if (isinstance(tokens, torch.Tensor) and isinstance(logits, torch.Tensor) and tokens.dim() == 2
            and not tokens.is_floating_point() and not tokens.is_complex() and tokens.dtype != torch.bool
            and logits.dim() == 3 and logits.is_floating_point() and tuple(logits.shape[:2]) == tuple(tokens.shape)):
        return "lm"
    return "mse"


def _model_ref(model_ref: str, captured: CapturedGraph, plan: Plan, notes: list[str]) -> tuple[str, dict]:
    """The reference train.py resolves (file paths made absolute) and the resolve() options
    that rebuild the shapes the plan was made for."""
    if not isinstance(model_ref, str) or not model_ref.strip():
        raise ExportError(f"model_ref={model_ref!r}; give the MODEL the plan was made for: a zoo name "
                          f"({', '.join(zoo.names()[:4])}, ...) or 'path/to/file.py:factory'")
    if model_ref in zoo.names() or ":" not in model_ref:
        kwargs: dict[str, Any] = {"batch_size": plan.batch_size}
        first = next((n.meta.get("val") for n in captured.gm.graph.nodes if n.op == "placeholder"), None)
        if isinstance(first, torch.Tensor) and first.dim() == 2 and not first.is_floating_point():
            kwargs["seq_len"] = int(first.shape[1])
        return model_ref, kwargs
    where, _, attr = model_ref.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        notes.append(f"train.py loads the model from {path}:{attr}; that file must exist at this path on every "
                     f"machine that runs it")
        return f"{path}:{attr}", {}
    notes.append(f"train.py imports {where!r}; it must be importable (installed or on PYTHONPATH) where it runs")
    return model_ref, {}


def _launch_script(nproc: int, machines: int, per_machine: int) -> str:
    if machines == 1:
        run = f'exec torchrun --standalone --nproc-per-node {nproc} "$HERE/train.py" "$@"'
        how = f"Runs {nproc} process(es) on this machine, one per planned device."
    else:
        run = (f'exec torchrun --nnodes {machines} --nproc-per-node {per_machine} --node-rank "${{NODE_RANK:?set '
               f'NODE_RANK (0..{machines - 1})}}" \\\n    --rdzv-backend c10d --rdzv-endpoint '
               f'"${{MASTER_ADDR:?set MASTER_ADDR to machine 0}}:${{MASTER_PORT:-29500}}" "$HERE/train.py" "$@"')
        how = (f"Run on each of the {machines} machines ({per_machine} process(es) each) with NODE_RANK and "
               f"MASTER_ADDR set.")
    return textwrap.dedent(f"""\
        #!/usr/bin/env bash
        # Generated by `fxshard export`: train with the plan in plan.json under torchrun.
        # {how}
        # Arguments go to train.py (--steps N, --lr LR, --seed S, --save FILE).
        set -euo pipefail
        HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
        """) + run + "\n"


_TRAIN_TEMPLATE = '''\
"""Train {model_name} with the fxshard plan in plan.json, under torchrun.

Generated by `fxshard export`. Launch with ./launch.sh ({nproc} process(es)), or
    torchrun --standalone --nproc-per-node {nproc} train.py --steps 10

Every rank rebuilds the model from the same seed, binds it to the plan with
fxshard.CompiledModel(..., plan=plan) (which checks that the model still captures to the graph
the plan was made for), builds only its own stage, and trains it with AdamW.

REPLACE THE DATA AND THE LOSS before training anything real:
- `batches()` yields the model's example batch every step (random numbers where the model was
  built on the meta device). Every rank must feed the same batch: the first stage reads the
  inputs, the last stage the target.
- `loss_fn` is {loss_doc}
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils._pytree as pytree

import fxshard
from fxshard.runtime.distributed import init_process_group_from_env
from fxshard.zoo import resolve

HERE = Path(__file__).resolve().parent
MODEL_REF = {model_ref!r}
RESOLVE_KWARGS = {resolve_kwargs!r}  # rebuilds the input shapes the plan was made for
LOSS = {loss_kind!r}


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: (batch, seq, vocab) logits against the tokens shifted by one."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def mse_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Placeholder: the first output tensor's mean square (MSE against zeros); ignores target."""
    out = next(t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor))
    return F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))


loss_fn = lm_loss if LOSS == "lm" else mse_loss


def _real(value: Any) -> Any:
    """A tensor as data: meta tensors (a model built on the meta device) become random ones."""
    if not isinstance(value, torch.Tensor) or value.device.type != "meta":
        return value
    if value.is_floating_point():
        return torch.randn(value.shape, dtype=value.dtype)
    return torch.randint(0, 2, value.shape, dtype=value.dtype)  # placeholder token ids


def batches(example_inputs: tuple, example_kwargs: dict, batch_size: int) -> Iterator[tuple[tuple, dict, Any]]:
    """(inputs, keyword inputs, target) per step; replace with your data loader."""
    inputs = pytree.tree_map(_real, example_inputs)
    kwargs = pytree.tree_map(_real, example_kwargs)
    if LOSS == "lm":
        target = torch.roll(inputs[0], shifts=-1, dims=1)  # next-token prediction
    else:
        target = torch.zeros(batch_size)  # unused by mse_loss; the schedule splits it per micro-batch
    while True:
        yield inputs, kwargs, target


def main() -> None:
    parser = argparse.ArgumentParser(description="Train with the fxshard plan in plan.json (under torchrun).")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="model init and data seed, the same on every rank")
    parser.add_argument("--plan", type=Path, default=HERE / "plan.json", help="the plan (default: plan.json here)")
    parser.add_argument("--save", type=Path, help="write the trained state_dict (original names) here")
    args = parser.parse_args()

    init_process_group_from_env()
    rank = dist.get_rank()
    plan = fxshard.Plan.from_json(args.plan.read_text())
    built = resolve(MODEL_REF, seed=args.seed, **RESOLVE_KWARGS)
    compiled = fxshard.CompiledModel(built.model, fxshard.Cluster.from_dict(plan.cluster), built.example_inputs,
                                     example_kwargs=built.example_kwargs or None, plan=plan, loss_fn=loss_fn)
    if rank == 0:
        print(plan, flush=True)
    params = list(compiled.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr) if params else None
    torch.manual_seed(args.seed)
    data = batches(built.example_inputs, dict(built.example_kwargs), plan.batch_size)
    for step in range(args.steps):
        inputs, kwargs, target = next(data)
        if optimizer is not None:
            optimizer.zero_grad()
        loss = compiled.step(*inputs, target=target, **kwargs)
        if optimizer is not None:
            optimizer.step()
        if loss is not None:
            print(f"rank {{rank}} step {{step}} loss {{loss.item():.4f}}", flush=True)
    if args.save is not None:
        state = compiled.state_dict(gather=True)
        if rank == 0:
            torch.save(state, args.save)
            print(f"saved {{len(state)}} tensors to {{args.save}}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
'''

_LOSS_DOC = {
    "lm": "next-token cross entropy on the first input (token ids), for a model that returns\n"
          "  (batch, seq, vocab) logits; replace `lm_loss` for any other objective.",
    "mse": "a placeholder (MSE of the first output against zeros); replace `mse_loss` with your\n"
           "  objective and `batches()` with data that has real targets.",
}


def _train_script(plan: Plan, model_ref: str, resolve_kwargs: Mapping[str, Any], loss_kind: str, nproc: int) -> str:
    return _TRAIN_TEMPLATE.format(model_name=_one_line(plan.model.name), nproc=nproc, model_ref=model_ref,
                                  resolve_kwargs=dict(resolve_kwargs), loss_kind=loss_kind,
                                  loss_doc=_LOSS_DOC[loss_kind])


def _readme(plan: Plan, k: int, launch: str, split: Mapping[str, Any], notes: list[str]) -> str:
    schedule = f", schedule {plan.schedule}" if plan.schedule else ""
    rows = {
        "plan.json": "the plan; `fxshard.Plan.from_json(text)` reads it back, `fxshard simulate plan.json` replays it",
        "train.py": "rebuilds the model, binds it to the plan with `fxshard.CompiledModel(..., plan=plan)` (which "
                    "checks the graph fingerprint) and trains with AdamW under torchrun",
        "launch.sh": "starts `train.py` under torchrun, one process per planned device",
        **{f"stage_{i}.py": f"stage {i}'s fx-generated `forward` with a header (devices, values received and sent, "
                            f"tensors held); for reading, not runnable alone" for i in range(k)},
        "split_spec.json": "the cuts as `torch.distributed.pipelining` split points (`split_spec`: module name -> "
                           "`\"BEGINNING\"`); under `not_on_module_boundary` the cuts an upstream split cannot make",
        "stages.json": "torchtitan-style module names per stage (`module_names_per_stage`), and the nodes no whole "
                       "module covers",
    }
    text = textwrap.dedent(f"""\
        # fxshard export: {_one_line(plan.model.name)}

        A {plan.strategy} plan: {k} stage(s) x {plan.replicas} replica(s){schedule}, {plan.microbatches}
        micro-batch(es), batch {plan.batch_size}, predicted step {plan.estimate.step_time_s * 1e3:.2f} ms.

        ## Launch

        ```
        {launch}
        ```

        Arguments go to `train.py`: `--steps N`, `--lr LR`, `--seed S`, `--save FILE`. Replace the data
        (`batches()`) and the loss (`loss_fn`) in `train.py` first: the generated ones train on the example batch.

        ## Files

        | file | what |
        | --- | --- |
        """)
    text += "".join(f"| `{name}` | {what} |\n" for name, what in rows.items())
    text += textwrap.dedent(f"""
        Upstream split points: {", ".join(split["split_spec"]) or "none"}
        ({len(split["not_on_module_boundary"])} cut(s) not on a module boundary). With every cut on a boundary:

        ```python
        from torch.distributed.pipelining import SplitPoint, pipeline
        spec = {{name: SplitPoint.BEGINNING for name in json.load(open("split_spec.json"))["split_spec"]}}
        pipe = pipeline(model, mb_args=(microbatch,), split_spec=spec)
        ```
        """)
    if notes:
        text += "\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes)
    return text


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def export_plan(captured: CapturedGraph, plan: Plan, out_dir: str | Path, *, model_ref: str,
                resolve_kwargs: Mapping[str, Any] | None = None) -> ExportResult:
    """Write a plan's stage sources, plan.json, a torchrun launcher and split specs to ``out_dir``.

    Args:
        captured: the graph the plan was made for.
        plan: the plan.
        out_dir: directory to write into (created; files of the same names are replaced).
        model_ref: the MODEL the plan was made for, as the CLI takes it: a zoo name or
            ``path/to/file.py:factory`` / ``package.module:factory``; train.py rebuilds the
            model from it with :func:`fxshard.zoo.resolve` (a relative file path is made absolute).
        resolve_kwargs: options train.py passes to ``resolve`` (default: for zoo names, the
            plan's batch size, and the sequence length of (batch, seq) token inputs).

    Returns:
        An :class:`ExportResult` naming the files written, with notes.

    Raises:
        ExportError: the plan was made for another graph, a bad ``model_ref``, or the
            directory cannot be written.
    """
    stage_of = _assignment(captured, plan)
    notes: list[str] = []
    ref, kwargs = _model_ref(model_ref, captured, plan, notes)
    if resolve_kwargs is not None:
        kwargs = dict(resolve_kwargs)
    k = plan.num_stages
    split = split_graph(captured, stage_of, k)
    spec = split_points(captured, plan)
    modules = stage_modules(captured, plan)
    nproc, machines, per_machine = _process_layout(plan)
    loss_kind = _loss_kind(captured)
    for off in spec["not_on_module_boundary"]:
        notes.append(f"the cut before stage {off['stage']} is not on a module boundary ({off['reason']}); an "
                     f"upstream split_spec pipeline would split differently")
    if machines > 1:
        notes.append(f"the plan spans {machines} machines: run launch.sh on each with NODE_RANK and MASTER_ADDR set "
                     f"({per_machine} process(es) per machine)")
    if not plan.training:
        notes.append("the plan was made for inference (training=False); train.py trains anyway, beyond the "
                     "plan's memory estimate")
    if loss_kind == "mse":
        notes.append("train.py's loss is a placeholder (MSE of the output against zeros): replace loss_fn and "
                     "the data in batches()")
    launch = "./launch.sh --steps 10" if machines == 1 else "NODE_RANK=<0..> MASTER_ADDR=<host> ./launch.sh --steps 10"
    files: dict[str, str] = {}
    for stage in split.stages:
        files[f"stage_{stage.index}.py"] = _stage_source(captured, plan, stage)
    files["plan.json"] = plan.to_json() + "\n"
    files["train.py"] = _train_script(plan, ref, kwargs, loss_kind, nproc)
    files["launch.sh"] = _launch_script(nproc, machines, per_machine)
    files["split_spec.json"] = json.dumps(spec, indent=2) + "\n"
    files["stages.json"] = json.dumps(modules, indent=2) + "\n"
    files["README.md"] = _readme(plan, k, launch, spec, notes)
    out = Path(out_dir)
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = out / name
            path.write_text(text)
            written.append(path)
        (out / "launch.sh").chmod(0o755)
        stale = sorted(p.name for p in out.glob("stage_*.py") if p.name not in files)
    except OSError as e:
        raise ExportError(f"cannot write the export to {str(out)!r} ({e.strerror or e}); give --out a directory "
                          f"you can write to") from e
    if stale:
        notes.append(f"{out} also holds {', '.join(stale)} from an earlier export; this plan has {k} stage(s)")
    return ExportResult(out_dir=out, files=tuple(written), notes=tuple(notes), nproc=nproc, launch_command=launch)
