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

The analyses behind ``split_spec.json`` and ``stages.json`` (:func:`split_points`,
:func:`stage_modules`) live in :mod:`fxshard.passes.split_spec` and are re-exported here; train.py
is rendered from the package's ``templates/train.py.tmpl``. This module writes the files; nothing
here prints. See docs/runtime.md for how stages run.

Example::

    captured = fxshard.capture(model, (tokens,))
    plan = fxshard.plan(model, "4xA100-80GB", (tokens,))
    result = export_plan(captured, plan, "out/", model_ref="gpt2")
    print(result.launch_command)
"""

from __future__ import annotations

import dataclasses
import json
import string
import textwrap
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxshard import zoo
from fxshard.capture import CapturedGraph
from fxshard.errors import ExportError  # defined there, re-exported here
from fxshard.passes.split import StageGraph, split_graph
from fxshard.passes.split_spec import check_plan_matches, split_points, stage_modules  # re-exported here
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


# What a stage's activation checkpointing policy does at run time (fxshard.runtime.checkpointing).
_CHECKPOINTING_NOTE = {
    "none": "none (every activation the backward needs is kept)",
    "selective": "selective (each repeated block runs under torch.utils.checkpoint with a selective policy: "
                 "matmul and attention outputs kept, the element-wise ops recomputed in backward)",
    "full": "full (each repeated block runs under torch.utils.checkpoint: only its input is kept, the block "
            "is recomputed in backward)",
}


def _data_parallel_note(plan: Plan) -> str:
    """How the plan's data-parallel groups hold the model, in words."""
    if plan.data_parallel == "fsdp":
        return (f"fsdp over {plan.replicas} device(s) per stage (FSDP2 fully_shard on each repeated block, then "
                f"the stage; parameters, gradients and optimizer state sharded; "
                + ("reshard after forward)" if plan.reshard_after_forward else "parameters kept gathered from "
                   "forward to backward)"))
    return f"ddp over {plan.replicas} replica(s) per stage (gradients all-reduced once per step)"


def _summary(plan: Plan) -> str:
    """The plan in one line: "fsdp (8 FSDP shards), full activation checkpointing, 4 micro-batches accumulated"."""
    levers = plan.levers_text()
    return f"{plan.strategy} ({plan.shape_text()})" + (f", {levers}" if levers else "")


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
    lines += _comment("activation checkpointing", [_CHECKPOINTING_NOTE[st.activation_checkpointing]])
    if plan.data_parallel is not None:
        lines += _comment("data parallel", [_data_parallel_note(plan)])
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


def _launch_script(plan: Plan, nproc: int, machines: int, per_machine: int) -> str:
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
        # The plan: {_summary(plan)}.
        # {how}
        # Arguments go to train.py (--steps N, --lr LR, --seed S, --save FILE).
        set -euo pipefail
        HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
        """) + run + "\n"


# The train.py template, package data (setup.py's package_data ships it); string.Template syntax.
_TRAIN_TEMPLATE = "templates/train.py.tmpl"

_LOSS_DOC = {
    "lm": "next-token cross entropy on the first input (token ids), for a model that returns\n"
          "  (batch, seq, vocab) logits; replace `lm_loss` for any other objective.",
    "mse": "a placeholder (MSE of the first output against zeros); replace `mse_loss` with your\n"
           "  objective and `batches()` with data that has real targets.",
}


def _train_script(plan: Plan, model_ref: str, resolve_kwargs: Mapping[str, Any], loss_kind: str, nproc: int) -> str:
    """train.py: the package's ``templates/train.py.tmpl`` with the plan's figures filled in."""
    template = string.Template(resources.files("fxshard").joinpath(_TRAIN_TEMPLATE).read_text(encoding="utf-8"))
    return template.substitute(model_name=_one_line(plan.model.name), nproc=nproc, model_ref=repr(model_ref),
                               plan_summary=_summary(plan),
                               resolve_kwargs=repr(dict(resolve_kwargs)), loss_kind=repr(loss_kind),
                               loss_doc=_LOSS_DOC[loss_kind])


def _readme(plan: Plan, k: int, launch: str, split: Mapping[str, Any], notes: list[str]) -> str:
    schedule = f", schedule {plan.schedule}" if plan.schedule else ""
    levers = f"The plan: {_summary(plan)}" + ("." if plan.levers_text() else "; no memory lever pulled.")
    if plan.data_parallel is not None:
        levers += f" Data parallel: {_data_parallel_note(plan)}."
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
        {levers}

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
    stage_of = check_plan_matches(captured, plan)
    notes: list[str] = []
    ref, kwargs = _model_ref(model_ref, captured, plan, notes)
    if resolve_kwargs is not None:
        kwargs = dict(resolve_kwargs)
    spec = split_points(captured, plan)
    nproc, machines, per_machine = _process_layout(plan)
    loss_kind = _loss_kind(captured)
    notes += _layout_notes(plan, spec, machines, per_machine, loss_kind)
    launch = "./launch.sh --steps 10" if machines == 1 else "NODE_RANK=<0..> MASTER_ADDR=<host> ./launch.sh --steps 10"
    files: dict[str, str] = {}
    for stage in split_graph(captured, stage_of, plan.num_stages).stages:
        files[f"stage_{stage.index}.py"] = _stage_source(captured, plan, stage)
    files["plan.json"] = plan.to_json() + "\n"
    files["train.py"] = _train_script(plan, ref, kwargs, loss_kind, nproc)
    files["launch.sh"] = _launch_script(plan, nproc, machines, per_machine)
    files["split_spec.json"] = json.dumps(spec, indent=2) + "\n"
    files["stages.json"] = json.dumps(stage_modules(captured, plan), indent=2) + "\n"
    files["README.md"] = _readme(plan, plan.num_stages, launch, spec, notes)
    out = Path(out_dir)
    written = _write(out, files)
    stale = sorted(p.name for p in out.glob("stage_*.py") if p.name not in files)
    if stale:
        notes.append(f"{out} also holds {', '.join(stale)} from an earlier export; this plan has "
                     f"{plan.num_stages} stage(s)")
    return ExportResult(out_dir=out, files=written, notes=tuple(notes), nproc=nproc, launch_command=launch)


def _layout_notes(plan: Plan, spec: Mapping[str, Any], machines: int, per_machine: int, loss_kind: str) -> list[str]:
    """What the user should know about the cuts, the machines, the mode and the loss of train.py."""
    notes = [f"the cut before stage {off['stage']} is not on a module boundary ({off['reason']}); an "
             f"upstream split_spec pipeline would split differently" for off in spec["not_on_module_boundary"]]
    if machines > 1:
        notes.append(f"the plan spans {machines} machines: run launch.sh on each with NODE_RANK and MASTER_ADDR set "
                     f"({per_machine} process(es) per machine)")
    if not plan.training:
        notes.append("the plan was made for inference (training=False); train.py trains anyway, beyond the "
                     "plan's memory estimate")
    if loss_kind == "mse":
        notes.append("train.py's loss is a placeholder (MSE of the output against zeros): replace loss_fn and "
                     "the data in batches()")
    return notes


def _write(out: Path, files: Mapping[str, str]) -> tuple[Path, ...]:
    """Write ``files`` (name -> text) into ``out``, launch.sh executable; the paths, in order."""
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = out / name
            path.write_text(text)
            written.append(path)
        (out / "launch.sh").chmod(0o755)
    except OSError as e:
        raise ExportError(f"cannot write the export to {str(out)!r} ({e.strerror or e}); give --out a directory "
                          f"you can write to") from e
    return tuple(written)
