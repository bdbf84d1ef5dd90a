"""Runtime under torchrun: each rank builds and runs only its own stage(s).

Rank r is the plan's device r (global rank order, machine by machine). The ranks form a
``DeviceMesh`` of (pipeline ranks, data-parallel replicas): stage s's replicas are the plan's
``devices`` of that stage. Each rank splits the captured graph, keeps its stages, moves them
to its device (materialising a meta model's weights there only), wraps them in
``DistributedDataParallel`` over its replica group for hybrid plans, and hands them to
``torch.distributed.pipelining.PipelineStage`` with the plan's schedule class.

Every rank calls ``step`` with the same whole batch: a pipeline's first stage reads the
inputs, its last the target; a replica takes its share of the batch. A parameter held by
several stages (a tied embedding and LM head) has its gradients summed over the ranks holding
it after backward, as Megatron does for embeddings. See docs/runtime.md.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
import torch.utils._pytree as pytree

from fxshard.capture import CapturedGraph
from fxshard.errors import ExecutionError
from fxshard.passes.split import split_graph
from fxshard.plan import Plan
from fxshard.runtime.agreement import agree, device_mismatch, fingerprint_mismatch
from fxshard.runtime.failures import FAILURE_KEY, POLL_S, first_line, gloo_line, is_comm_error, pg_timeout_s
from fxshard.runtime.loss import LossCall, call_loss, check_loss_call, leading_rows
from fxshard.simulate import SCHEDULES

__all__ = ["DistributedPipeline", "rank_device"]


def rank_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK with NCCL, else the CPU."""
    import os

    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class _TensorInputs(torch.nn.Module):
    """Stage 0 as torch pipelining calls it: tensor inputs only, constants filled back in."""

    def __init__(self, stage: torch.nn.Module, template: tuple[tuple[bool, Any], ...]) -> None:
        super().__init__()
        self.stage = stage
        self.template = template

    def forward(self, *tensors: Any) -> Any:
        it = iter(tensors)
        return self.stage(*[next(it) if is_tensor else const for is_tensor, const in self.template])


def _materialise(module: torch.nn.Module, device: torch.device) -> None:
    """Move a stage to its device; a meta stage gets real memory and its modules' own init."""
    if any(t.device.type == "meta" for t in list(module.parameters()) + list(module.buffers())):
        module.to_empty(device=device)
        with torch.no_grad():
            for sub in module.modules():
                if hasattr(sub, "reset_parameters") and sub is not module:
                    sub.reset_parameters()
    else:
        module.to(device)


class DistributedPipeline:
    """This rank's part of a plan, run with torch.distributed.pipelining (or DDP)."""

    def __init__(self, captured: CapturedGraph, plan: Plan, *, loss_fn: Callable | None = None,
                 aliases: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self.captured = captured
        self.aliases = dict(aliases or {})
        self.plan = plan
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = rank_device()
        self.loss_fn = loss_fn
        self._failure: str | None = None
        self._calls = 0
        self._store = dist.distributed_c10d._get_default_store()  # kept: it outlives a destroyed group
        self._timeout_s = pg_timeout_s()
        self._monitor: Any = None
        self._in_call = False
        self._sending = False
        self.grace_s = 2.0
        agree(self._objection())
        if plan.strategy in ("single", "ddp"):
            self._init_data_parallel()
        else:
            self._init_pipeline()

    # -- construction -----------------------------------------------------------------

    def _objection(self) -> str | None:
        """Why this rank cannot run the plan (checked on every rank, agreed before building)."""
        plan, captured = self.plan, self.captured
        needed = sorted({d for s in plan.stages for d in s.device_indices})
        if self.world != len(needed):
            return (f"the plan runs on {len(needed)} processes ({plan.strategy}, {plan.num_stages} stage(s) x "
                    f"{plan.replicas} replica(s)) but torchrun started {self.world}; run "
                    f"'torchrun --nproc-per-node {len(needed)} ...' or re-plan for {self.world} devices")
        return (fingerprint_mismatch(plan, captured.model_name, captured.fingerprint(), len(captured.nodes))
                or device_mismatch(plan, self.rank, self.device, dist.get_backend()))

    def _init_data_parallel(self) -> None:
        self.module = self.captured.gm
        _materialise(self.module, self.device)
        self.replica = self.rank
        self.replicas = self.plan.replicas
        if self.replicas > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device] if self.device.type == "cuda" else None)
        else:
            self.ddp = self.module
        self.schedule = None
        self.local_stages = []

    def _init_pipeline(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import get_schedule_class

        plan = self.plan
        d = plan.replicas
        ranks = sorted({s.device_indices[0] for s in plan.stages})
        pp = len(ranks)
        self.mesh = init_device_mesh(self.device.type, (pp, d), mesh_dim_names=("pp", "dp"))
        pp_group, dp_group = self.mesh.get_group("pp"), self.mesh.get_group("dp")
        self.replica = self.rank % d
        self.replicas = d
        self.dp_group = dp_group
        # Zero-bubble schedules detach stage outputs in place between the input- and weight-
        # gradient steps: every output must then be a tensor of its own.
        split = split_graph(self.captured, plan.stage_of(), plan.num_stages,
                            copy_outputs=plan.schedule in ("zbv", "interleavedzb"))
        mine = [s for s in plan.stages if self.rank in s.device_indices]
        self.local_stages = []
        self._shared = self._shared_groups(split)
        self._local_copies = self._separate_local_ties([split.stages[s.index].module for s in mine])
        examples = self._static_examples(split)
        stages = []
        for s in mine:
            module: torch.nn.Module = split.stages[s.index].module
            _materialise(module, self.device)
            if s.index == 0:
                module = self._wrap_inputs(module)
            self.local_stages.append(module)
            io = examples[s.index] if examples is not None else None
            static = {} if io is None else {"input_args": io[0], "output_args": io[1]}
            stages.append(PipelineStage(module, s.index, plan.num_stages, self.device, group=pp_group, **static))
        name, per_rank = SCHEDULES[plan.schedule]
        cls = get_schedule_class(name)
        loss = self._wrapped_loss()
        target = stages[0] if per_rank == 1 else stages
        self.schedule = cls(target, plan.microbatches, loss_fn=loss)
        self.first = any(s.index == 0 for s in mine)
        self.last = any(s.index == plan.num_stages - 1 for s in mine)

    def _static_examples(self, split: Any) -> list | None:
        """Stage input and output metadata for torch's static mode, when a number crosses a
        stage boundary (None otherwise: torch infers it from the first micro-batch).

        torch's dynamic inference runs each stage once on uninitialised buffers; a stage that
        computes with a received number (``x.view(n, -1)`` with ``n = x.size(0)`` from an
        earlier stage) would read garbage there. The metadata comes from a fake-tensor run of
        the captured graph at one micro-batch, which gives the numbers their real values."""
        from fxshard.passes.split import carries_numbers, stage_io_examples

        captured_values = {n.name: n.meta.get("val") for n in self.captured.gm.graph.nodes}
        if not carries_numbers(split, captured_values):
            return None
        values, flat = self._microbatch_values()
        examples = stage_io_examples(split, values, flat)
        if any(e is None for e in examples):
            raise ExecutionError(
                f"{self.captured.model_name} passes a number between stages and returns a non-tensor output; under "
                f"torchrun the last stage must return tensors only. Return tensors (torch.tensor(n)) from forward")
        return examples

    def _microbatch_values(self) -> tuple[dict[str, Any], list[Any]]:
        """Every node's value at one micro-batch (fake tensors; numbers are real numbers)."""
        captured, plan = self.captured, self.plan
        share = plan.batch_size // (plan.replicas * plan.microbatches)
        placeholders = [n for n in captured.fake_module.graph.nodes if n.op == "placeholder"]
        flat: list[Any] = []
        with captured.fake_mode:
            for node in placeholders:
                v = node.meta.get("val")
                if (isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == plan.batch_size
                        and captured.fixed_batch is None):
                    v = torch.empty((share, *v.shape[1:]), dtype=v.dtype, device=v.device)
                flat.append(v)
        values: dict[str, Any] = {}

        class Record(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                result = super().run_node(n)
                values[n.name] = result
                return result

        with captured.fake_mode:
            Record(captured.fake_module).run(*flat)
        return values, flat

    def _wrap_inputs(self, module: torch.nn.Module) -> torch.nn.Module:
        example = [n.meta.get("val") for n in self.captured.gm.graph.nodes if n.op == "placeholder"]
        template = tuple((isinstance(v, torch.Tensor), None if isinstance(v, torch.Tensor) else v) for v in example)
        return _TensorInputs(module, template) if not all(t for t, _ in template) else module

    def _shared_groups(self, split: Any) -> list[tuple[list[torch.nn.Parameter], Any]]:
        """Process groups, one per replica index, of the ranks holding each tensor that several
        stages hold (DDP already averages each stage's replicas; these groups add up the
        stages' contributions)."""
        holders: dict[str, dict[int, set[int]]] = {}
        for stage, plan_stage in zip(split.stages, self.plan.stages):
            for name, _ in stage.module.named_parameters():
                by_replica = holders.setdefault(self._canonical(stage.module, name), {})
                for j, rank in enumerate(plan_stage.device_indices):
                    by_replica.setdefault(j, set()).add(rank)
        groups = []
        for name in sorted(holders):  # every rank creates every group, in the same order
            for j in sorted(holders[name]):
                ranks = sorted(holders[name][j])
                if len(ranks) <= 1:
                    continue
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    params = [p for st in split.stages if self.rank in self.plan.stages[st.index].device_indices
                              for n, p in st.module.named_parameters() if self._canonical(st.module, n) == name]
                    groups.append((params, group))
        return groups

    @staticmethod
    def _separate_local_ties(modules: list[torch.nn.Module]) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """Give each of this rank's stages its own copy of a parameter two of them share.

        Schedules that split backward into input and weight steps set each stage's weight
        gradients separately, so two stages sharing one Parameter would overwrite each other;
        the copies' gradients are added into the first stage's after every step.
        """
        from fxshard.runtime.local import _set_param

        owner: dict[int, torch.nn.Parameter] = {}
        pairs = []
        for module in modules:
            for name, param in list(module.named_parameters(remove_duplicate=False)):
                if id(param) not in owner:
                    owner[id(param)] = param
                    continue
                replica = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                _set_param(module, name, replica)
                pairs.append((param, replica))
        return pairs

    def _canonical(self, module: torch.nn.Module, name: str) -> str:
        param = module.get_parameter(name)
        return self.captured.param_names.get(id(param), name)

    def _wrapped_loss(self) -> Callable | None:
        if self.loss_fn is None:
            return None
        rebuild = self.captured.output_spec.rebuild
        user = self.loss_fn

        def loss(output: Any, target: Any) -> torch.Tensor:
            flat = output if isinstance(output, tuple) else (output,)
            i, self._loss_index = self._loss_index, self._loss_index + 1
            return call_loss(user, rebuild(flat), target, self._loss_call, microbatch=i)

        return loss

    # -- running ------------------------------------------------------------------------

    def _shard(self, values: Any) -> Any:
        if self.replicas == 1:
            return values

        def cut(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                if t.shape[0] % self.replicas:
                    raise ExecutionError(f"a batch of {t.shape[0]} does not split over {self.replicas} replicas")
                size = t.shape[0] // self.replicas
                return t.narrow(0, self.replica * size, size)
            return t

        return pytree.tree_map(cut, values)

    def _flat_tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        flat = self.captured.flatten_inputs(args, kwargs)
        return [v.to(self.device) for v in flat if isinstance(v, torch.Tensor)]

    def forward(self, args: tuple, kwargs: dict) -> Any:
        """Whole-batch forward; the model's outputs on the last stage's ranks, None elsewhere."""
        return self._guarded("forward", self._forward, args, kwargs)

    def step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> torch.Tensor | None:
        """One forward and backward over the batch; the mean loss on the last stage's ranks."""
        return self._guarded("step", self._step, args, kwargs, target, loss_fn)

    # -- failures -------------------------------------------------------------------------

    def _guarded(self, what: str, fn: Callable, *args: Any) -> Any:
        """Run ``fn``; turn a failure anywhere in the job into an ExecutionError on every rank.

        A rank whose own code raises publishes the error in the job's store; the monitors of
        the ranks blocked on it (see :meth:`_start_monitor`) stop them within seconds instead
        of at the process group's timeout. A rank whose communication fails (a peer closed
        its connection, died, or sent nothing within the timeout) names the rank that failed
        first, when that rank published its error, and publishes its own failure in turn.
        Either way the pipeline is then unusable: later calls raise at once (restart the job
        and resume from a checkpoint). fxshard's own checks of a call (inputs, the loss call's
        target) run alike on every rank before any message and leave the pipeline usable; an
        ExecutionError raised once messages flow (the loss failing on its arguments inside the
        schedule) is a failure like any other."""
        if self._failure is not None:
            raise ExecutionError(f"rank {self.rank}: this pipeline already failed ({self._failure}); restart the "
                                 f"job (torchrun) and resume from the last checkpoint")
        self._calls += 1
        self._start_monitor()
        self._in_call = True
        self._sending = False
        try:
            return fn(*args)
        except ExecutionError as e:
            if not self._sending:
                raise  # fxshard's own checks of the call, made alike on every rank before any message
            self._fail(f"rank {self.rank} failed in {what} #{self._calls}: {e}")  # the loss, mid-schedule
            raise ExecutionError(f"{self._failure}; the other ranks were told to stop") from e
        except Exception as e:  # every failure must reach the other ranks
            if is_comm_error(e):
                first = self._published_failures()
                if first:
                    why = first
                elif "Timed out" in str(e) or "Socket Timeout" in str(e):
                    why = (f"no message from a peer rank within the process group's timeout of "
                           f"{self._timeout_s:.0f} s: a rank is hung or far slower than the others ({gloo_line(e)})")
                else:
                    why = f"a peer rank closed its connection without reporting an error: it died ({gloo_line(e)})"
                # Published too: ranks blocked on this one stop now rather than at their timeout.
                self._fail(f"communication failed on rank {self.rank} in {what} #{self._calls}: {why}")
                raise ExecutionError(f"{self._failure}. Check that rank's log; the process group's timeout "
                                     f"is {self._timeout_s:.0f} s") from e
            root = first_line(e)
            self._fail(f"rank {self.rank} failed in {what} #{self._calls}: "
                       + (root if e.__cause__ is not None else f"{type(e).__name__}: {root}"))
            raise ExecutionError(f"{self._failure}; the other ranks were told to stop") from e
        finally:
            self._in_call = False

    def _fail(self, message: str) -> None:
        """Publish this rank's failure; the other ranks' monitors stop them (_start_monitor)."""
        self._failure = message
        try:
            self._store.set(f"fxshard/failed/{self.rank}", message)
            self._store.compare_set(FAILURE_KEY, "", message)  # the first failure wins
        except Exception:  # the store's host may be gone already
            pass

    def _published_failures(self) -> str:
        """The first error another rank published, waiting briefly for it to arrive."""
        import time

        deadline = time.monotonic() + 2.0
        while True:
            try:
                if self._store.check([FAILURE_KEY]):
                    return self._store.get(FAILURE_KEY).decode()
            except Exception:  # the store's host died with its rank
                return ""
            if time.monotonic() > deadline:
                return ""
            time.sleep(0.05)

    def _start_monitor(self) -> None:
        """A daemon thread that ends this process when another rank has published a failure
        and this rank is still inside a pipeline call ``grace_s`` later: blocked in a receive
        from the failed rank, which only the process group's timeout would end. Exits with
        status 1 after printing which rank failed and why.

        It reads the store only while this rank is inside a pipeline call, and it is stopped
        and joined at interpreter exit, so it is never inside a store call when the process
        (or the store's host) goes away."""
        import atexit
        import os
        import sys
        import threading

        if self._monitor is not None:
            return
        poll_s = POLL_S * max(1.0, self.world / 32)  # the store's host answers every rank
        stop = self._monitor_stop = threading.Event()

        def watch() -> None:
            while not stop.wait(poll_s):
                if not self._in_call:
                    continue
                try:
                    failed = self._store.check([FAILURE_KEY])
                    why = self._store.get(FAILURE_KEY).decode() if failed else ""
                except Exception:  # the store is gone: the job is over
                    return
                if not failed:
                    continue
                call = self._calls
                if stop.wait(self.grace_s):
                    return
                if self._in_call and self._calls == call and self._failure is None:
                    print(f"fxshard: rank {self.rank} stops: {why}; this rank was blocked in call #{call} waiting "
                          f"for it (exiting instead of waiting {self._timeout_s:.0f} s for the process group's "
                          f"timeout)", file=sys.stderr, flush=True)
                    os._exit(1)

        self._monitor = threading.Thread(target=watch, name="fxshard-failure-monitor", daemon=True)
        self._monitor.start()
        atexit.register(self._stop_monitor)

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor_stop.set()
            self._monitor.join(timeout=10.0)

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        args, kwargs = self._shard((args, kwargs))
        if self.schedule is None:
            flat = self.captured.flatten_inputs(args, kwargs)
            return self.captured.output_spec.rebuild(self.module(*_to(flat, self.device)))
        if not hasattr(self.schedule, "eval"):
            raise ExecutionError("this torch's pipeline schedules have no forward-only eval(); use step()")
        self._sending = True
        inputs = self._flat_tensors(args, kwargs) if self.first else []
        out = self.schedule.eval(*inputs)
        if not self.last:
            return None
        return self.captured.output_spec.rebuild(out if isinstance(out, tuple) else (out,))

    def _step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> torch.Tensor | None:
        if loss_fn is not self.loss_fn and self.schedule is not None:
            raise ExecutionError("under torchrun the loss is part of the pipeline schedule: pass loss_fn to "
                                 "fxshard.compile, not to step")
        if self.schedule is not None and target is not None and not isinstance(target, torch.Tensor):
            raise ExecutionError(f"under torchrun the target must be one tensor (torch.distributed.pipelining splits "
                                 f"it into micro-batches), got {type(target).__name__}; pack it into a tensor")
        # Checked alike on every rank (each gets the same batch and target) before any message.
        batch = leading_rows(self.captured.flatten_inputs(args, kwargs)) or 0
        how = LossCall(batch=batch, microbatches=1 if self.schedule is None else self.plan.microbatches,
                       replicas=self.replicas, has_target=target is not None)
        check_loss_call(loss_fn, target, how)
        args, kwargs, target = self._shard((args, kwargs, target))
        self._loss_call, self._loss_index = how, 0
        self._sending = True
        if self.schedule is None:
            flat = self.captured.flatten_inputs(args, kwargs)
            out = self.captured.output_spec.rebuild(self.ddp(*_to(flat, self.device)))
            loss = call_loss(loss_fn, out, _to(target, self.device), how)
            loss.backward()
            return self._replica_mean(loss.detach(), None)
        with torch.no_grad():
            for owner, replica in self._local_copies:
                replica.copy_(owner)
        losses: list[torch.Tensor] = []
        inputs = self._flat_tensors(args, kwargs) if self.first else []
        tgt = _to(target, self.device) if self.last else None
        self.schedule.step(*inputs, target=tgt, losses=losses if self.last else None)
        for owner, replica in self._local_copies:
            if replica.grad is not None:
                owner.grad = replica.grad.clone() if owner.grad is None else owner.grad + replica.grad
                replica.grad = None
        if self.replicas > 1:
            # Data-parallel replicas of a stage average their gradients over the mesh's dp
            # group once per step (DDP's reducer rejects the several backward passes per
            # step that micro-batches make: torch 2.13 asserts in reducer.cpp).
            for p in self.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.dp_group)
                p.grad /= self.replicas
        for params, group in self._shared:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
        if self.last:
            return self._replica_mean(torch.stack([loss.detach() for loss in losses]).mean(), self.dp_group)
        return None

    def _replica_mean(self, loss: torch.Tensor, group: Any) -> torch.Tensor:
        """The loss over the whole batch: the mean of the replicas' (equal-sized) shards."""
        if self.replicas > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=group)
            loss = loss / self.replicas
        return loss

    # -- parameters and checkpoints --------------------------------------------------------

    def _modules(self) -> list[torch.nn.Module]:
        return [self.module] if self.schedule is None else self.local_stages

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters (a local copy of a tied one is not listed: its owner is)."""
        seen = {id(replica) for _, replica in getattr(self, "_local_copies", ())}
        for module in self._modules():
            inner = _unwrap(module)
            for name, p in inner.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for _, p in self.named_parameters())

    def state_dict(self, *, gather: bool = False) -> dict[str, torch.Tensor]:
        """This rank's tensors under the original names; all ranks' with ``gather=True``.

        A tied tensor appears under every name the original model's ``state_dict`` gives it
        (``transformer.wte.weight`` and ``lm_head.weight``), whichever name its stage uses."""
        local: dict[str, torch.Tensor] = {}
        owner_of = {id(replica): owner for owner, replica in getattr(self, "_local_copies", ())}
        for module in self._modules():
            for name, t in _unwrap(module).state_dict(keep_vars=True).items():
                if name in self.captured.state_names:  # not fxshard's helpers, not non-persistent buffers
                    value = owner_of.get(id(t), t).detach().cpu().clone()
                    for alias in self.aliases.get(name, (name,)):
                        local.setdefault(alias, value)
        if not gather:
            return local
        merged: dict[str, torch.Tensor] = {}
        for part in self.gather_objects(local):
            for name, value in part.items():
                merged.setdefault(name, value)
        return merged

    def parameter_names(self) -> dict[int, str]:
        """``id(param) -> canonical name`` for this rank's parameters (the same name on every
        rank for a tied parameter)."""
        names = {}
        for module in self._modules():
            inner = _unwrap(module)
            for name, p in inner.named_parameters():
                name = self.captured.param_names.get(id(p), name)
                names.setdefault(id(p), self.aliases.get(name, (name,))[0])
        return names

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Load this rank's tensors from a state dict under the original names."""
        missing = []
        for module in self._modules():
            inner = _unwrap(module)
            own = inner.state_dict()
            for name in own:
                if name not in self.captured.state_names:
                    continue
                found = next((alias for alias in self.aliases.get(name, (name,)) if alias in state), None)
                if found is not None:
                    with torch.no_grad():
                        own[name].copy_(state[found])
                else:
                    missing.append(name)
        if strict and missing:
            raise ExecutionError(f"state dict lacks {len(missing)} tensors this rank holds, e.g. {missing[:3]}")
        return missing


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        module = module.module
    if isinstance(module, _TensorInputs):
        module = module.stage
    return module


def _to(value: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


def init_process_group_from_env(timeout_s: float = 120.0) -> None:
    """Initialise torch.distributed from torchrun's environment (gloo on CPU, NCCL on GPU)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
