"""The models, splits and per-rank runs of benchmarks/pipeline_payoff.py.

A *piece* is a model part a user splits at: the embedding, each repeated block (``h.3``,
``layers.3``, ``blocks.3``), the final norm, the head. Every captured graph node belongs to
one piece (the outermost module on its stack, or the piece before it for nodes outside any
module), so a split given in pieces is at once an fxshard stage assignment, an upstream
``SplitPoint`` map and the layout of hand-written stage modules.

Each rank runs every side of one comparison in the same process group, interleaved
(A B C A B C ...), each step being forward + backward + tied-gradient sum + optimizer step,
timed between two barriers (wall and this thread's CPU time).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxshard.models import GPT2, GPT2Config, Llama, LlamaConfig, ResNet, ResNetConfig
from fxshard.modules import stack_paths

__all__ = ["MODELS", "Job", "ModelCase", "pieces_of", "run_job"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelCase:
    """One model at one size: how to build it, its loss, and how its pieces are named."""

    name: str
    build: Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]  # -> (model, batch, target)
    blocks: str  # the repeated blocks' container ("h", "layers", "blocks")
    aliases: dict[str, str]  # top-level module -> piece, for modules that form one piece
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    hand: str | None = None  # family of the hand-written stage (gpt2, llama), None: not written


def _lm_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), target.flatten(0, 1))


def _language(cls: type, cfg: GPT2Config | LlamaConfig, batch: int, seq: int) -> Callable:
    """A decoder of ``cls`` with random tokens and next-token targets."""
    def build() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = cls(cfg)
        return model, torch.randint(0, cfg.vocab_size, (batch, seq)), torch.randint(0, cfg.vocab_size, (batch, seq))
    return build


def _resnet(cfg: ResNetConfig, batch: int, size: int) -> Callable:
    def build() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = ResNet(cfg)
        return model, torch.randn(batch, 3, size, size), torch.randint(0, cfg.num_classes, (batch,))
    return build


def _cases(quick: bool) -> dict[str, ModelCase]:
    if quick:
        gpt2 = _language(GPT2, GPT2Config(n_layer=4, n_head=2, n_embd=32, vocab_size=512, block_size=16), 4, 16)
        llama = _language(Llama, LlamaConfig(dim=32, n_layers=4, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                                             vocab_size=512, max_seq_len=16), 4, 16)
        resnet = _resnet(ResNetConfig(layers=(1, 1), width=4, num_classes=10), 4, 16)
    else:
        # CPU-sized, with GPT-2's full 50257-token vocabulary: the tied LM head is heavy.
        gpt2 = _language(GPT2, GPT2Config(n_layer=8, n_head=4, n_embd=256, vocab_size=50257, block_size=64), 8, 64)
        llama = _language(Llama, LlamaConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, ffn_hidden=688,
                                             vocab_size=32000, max_seq_len=64), 8, 64)
        resnet = _resnet(ResNetConfig(layers=(2, 2, 2, 2), width=16, num_classes=1000), 8, 64)
    return {
        "gpt2": ModelCase(name="gpt2", build=gpt2, blocks="h", aliases={"wte": "embed", "wpe": "embed"},
                          loss=_lm_loss, hand="gpt2"),
        "llama": ModelCase(name="llama", build=llama, blocks="layers", aliases={"tok_embeddings": "embed"},
                           loss=_lm_loss, hand="llama"),
        "resnet": ModelCase(name="resnet", build=resnet, blocks="blocks", aliases={"pool": "fc"},
                            loss=F.cross_entropy),
    }


MODELS = ("gpt2", "llama", "resnet")


def case(name: str, quick: bool) -> ModelCase:
    """The model case ``name`` at its quick or full size."""
    return _cases(quick)[name]


def pieces_of(gm: torch.fx.GraphModule, mc: ModelCase) -> dict[str, str]:
    """Node name -> piece, for every node of a captured graph, in graph order."""
    out: dict[str, str] = {}
    current: str | None = None
    pending: list[str] = []
    for node in gm.graph.nodes:
        paths = stack_paths(node) or ((str(node.target),) if node.op == "call_module" else ())
        piece = None
        if paths:
            block = next((q for q in paths if q.split(".")[0] == mc.blocks and q.count(".") >= 1), None)
            top = paths[0].split(".")[0]
            piece = ".".join(block.split(".")[:2]) if block else mc.aliases.get(top, top)
        if piece is None:
            if current is None:
                pending.append(node.name)  # before any module: goes with the first piece
                continue
            piece = current
        for name in pending:
            out[name] = piece
        pending.clear()
        out[node.name], current = piece, piece
    return out


def piece_order(pieces: dict[str, str]) -> list[str]:
    """The pieces in graph order."""
    return list(dict.fromkeys(pieces.values()))


def equal_split(order: list[str], blocks: str, k: int) -> list[str]:
    """The user's split: the k - 1 blocks at which stages 1..k-1 begin, equal block counts per stage."""
    names = [p for p in order if p.split(".")[0] == blocks]
    if len(names) < k:
        raise ValueError(f"{len(names)} blocks cannot be split into {k} stages of equal block counts")
    per, extra = divmod(len(names), k)
    starts, at = [], 0
    for s in range(k - 1):
        at += per + (1 if s < extra else 0)
        starts.append(names[at])
    return starts


def stage_of_pieces(order: list[str], starts: list[str]) -> dict[str, int]:
    """Piece -> stage for a split whose stage s >= 1 begins at piece ``starts[s - 1]``."""
    out, stage = {}, 0
    for p in order:
        if stage < len(starts) and p == starts[stage]:
            stage += 1
        out[p] = stage
    return out


# -- hand-written stages ----------------------------------------------------------------


class HandStage(nn.Module):
    """One rank's part of a GPT-2 or LLaMA, built from the model's own submodules."""

    def __init__(self, model: nn.Module, family: str, pieces: list[str]) -> None:
        super().__init__()
        self.family = family
        names = GPT2_NAMES if family == "gpt2" else LLAMA_NAMES
        self.embed = "embed" in pieces
        self.blocks = nn.ModuleList(model.get_submodule(p) for p in pieces if p.split(".")[0] == names["blocks"])
        self.emb = nn.ModuleList(getattr(model, n) for n in names["embed"]) if self.embed else None
        self.norm = getattr(model, names["norm"]) if names["norm"] in pieces else None
        self.head = getattr(model, names["head"]) if names["head"] in pieces else None
        if family == "llama":
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed:
            idx = x
            x = self.emb[0](idx)
            if self.family == "gpt2":
                x = x + self.emb[1](torch.arange(idx.size(1), device=idx.device))
        if self.family == "gpt2":
            for block in self.blocks:
                x = block(x)
        else:
            t = x.size(1)
            cos, sin = self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype)
            for block in self.blocks:
                x = block(x, cos, sin)
        if self.norm is not None:
            x = self.norm(x)
        return self.head(x) if self.head is not None else x


GPT2_NAMES = {"embed": ("wte", "wpe"), "blocks": "h", "norm": "ln_f", "head": "lm_head"}
LLAMA_NAMES = {"embed": ("tok_embeddings",), "blocks": "layers", "norm": "norm", "head": "output"}


# -- the per-rank job -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """What every rank runs: the sides to compare, as plans (fxshard) or piece splits."""

    model: str
    quick: bool
    world: int
    schedule: str  # fxshard's name: "1f1b", "gpipe"
    microbatches: int
    steps: int
    warmup: int
    devices: str
    sides: tuple[tuple[str, str, object], ...]  # (label, "fxshard" | "upstream" | "hand", plan JSON or starts)


class _Side:
    def __init__(self, label: str, run: Callable[[], None]) -> None:
        self.label, self.run = label, run
        self.wall: list[float] = []
        self.cpu: list[float] = []


def _tied_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Names of each parameter that the model holds under several names."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [tuple(v) for v in by_id.values() if len(v) > 1]


def _tied_sync(mine: list[torch.nn.Parameter | None], world: int) -> Callable[[], None]:
    """Sum the gradients of tied parameters over the ranks holding them (what fxshard does, and
    what a correct upstream or hand-written pipeline must do: each stage holds its own copy).
    ``mine``: per tied parameter of the model, this rank's copy or None."""
    import torch.distributed as dist

    syncs = []
    for p in mine:
        holders = [None] * world
        dist.all_gather_object(holders, p is not None)
        ranks = [r for r, h in enumerate(holders) if h]
        group = dist.new_group(ranks) if len(ranks) > 1 else None  # every rank calls new_group
        if group is not None and p is not None:
            syncs.append((p, group))

    def sync() -> None:
        for q, group in syncs:
            if q.grad is not None:
                dist.all_reduce(q.grad, group=group)
    return sync


def _schedule(name: str, stage: object, job: Job, loss: Callable) -> object:
    from torch.distributed.pipelining.schedules import get_schedule_class

    from fxshard.simulate import SCHEDULES

    return get_schedule_class(SCHEDULES[name][0])(stage, job.microbatches, loss_fn=loss)


def _pipeline_side(job: Job, mc: ModelCase, rank: int, module: nn.Module, stage: object, x: torch.Tensor,
                   target: torch.Tensor, tied: list[torch.nn.Parameter | None]) -> Callable[[], None]:
    sched = _schedule(job.schedule, stage, job, mc.loss)
    sync = _tied_sync(tied, job.world)
    update = _optimizer(module.parameters())

    def step() -> None:
        if rank == 0:
            sched.step(x)
        elif rank == job.world - 1:
            sched.step(target=target, losses=[])
        else:
            sched.step()
        sync()
        update()
    return step


def _optimizer(params: object) -> Callable[[], None]:
    """Adam's step and zero_grad over ``params``; nothing for a stage without parameters."""
    params = list(params)
    if not params:
        return lambda: None
    opt = torch.optim.Adam(params, lr=1e-5)

    def update() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return update


def _make_side(label: str, kind: str, spec: object, job: Job, mc: ModelCase, rank: int) -> _Side:
    import torch.distributed as dist

    import fxshard

    model, x, target = mc.build()
    tied = _tied_groups(model)
    device = torch.device("cpu")
    if kind == "fxshard":
        plan = fxshard.Plan.from_json(spec)
        compiled = fxshard.CompiledModel(model, job.devices, (x,), plan=plan, loss_fn=mc.loss)
        update = _optimizer(compiled.parameters())

        def step() -> None:
            compiled.step(x, target=target)
            update()
        return _Side(label, step)
    if kind == "upstream":
        from torch.distributed.pipelining import SplitPoint, pipeline

        mb = x.shape[0] // job.microbatches
        pipe = pipeline(model, mb_args=(x[:mb],), split_spec={s: SplitPoint.BEGINNING for s in spec})
        stage = pipe.build_stage(rank, device, dist.group.WORLD)
        module = pipe.get_stage_module(rank)
        local = dict(module.named_parameters())
        mine = [next((local[n] for n in names if n in local), None) for names in tied]
        return _Side(label, _pipeline_side(job, mc, rank, module, stage, x, target, mine))
    from torch.distributed.pipelining import PipelineStage

    order = list(spec[0])
    pieces = [p for p, s in stage_of_pieces(order, list(spec[1])).items() if s == rank]
    module = HandStage(model, mc.hand, pieces)
    held = {id(p) for p in module.parameters()}
    params = dict(model.named_parameters(remove_duplicate=False))
    mine = [next((params[n] for n in names if id(params[n]) in held), None) for names in tied]
    stage = PipelineStage(module, rank, job.world, device, group=dist.group.WORLD)
    return _Side(label, _pipeline_side(job, mc, rank, module, stage, x, target, mine))


def _timed(side: _Side) -> None:
    import torch.distributed as dist

    dist.barrier()
    w0, c0 = time.perf_counter(), time.thread_time()
    side.run()
    dist.barrier()
    side.wall.append(time.perf_counter() - w0)
    side.cpu.append(time.thread_time() - c0)


def rank_main(rank: int, job: Job) -> dict:
    """Build every side on this rank, warm up, then time the sides interleaved; per side, the
    rank's wall and CPU seconds per step."""
    mc = case(job.model, job.quick)
    sides = [_make_side(label, kind, spec, job, mc, rank) for label, kind, spec in job.sides]
    for _ in range(job.warmup):
        for side in sides:
            _timed(side)
    for side in sides:
        side.wall.clear()
        side.cpu.clear()
    for _ in range(job.steps):
        for side in sides:
            _timed(side)
    return {s.label: {"wall": s.wall, "cpu": s.cpu} for s in sides}


# -- processes ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, job: Job, port: int, queue: object) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(job.world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(job.world))
    import datetime
    import warnings

    import torch.distributed as dist

    from fxshard.cost_models.host_memory import retain_freed_memory

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    # Every side in the same allocator mode: fxshard's CPU ranks keep freed memory in the heap, so the
    # upstream and hand-written pipelines sharing this process do too (docs/calibration.md, "The CPU heap").
    retain_freed_memory()
    dist.init_process_group("gloo", rank=rank, world_size=job.world, timeout=datetime.timedelta(seconds=300))
    try:
        queue.put((rank, "ok", rank_main(rank, job)))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - any failure goes to the parent, which raises it with this traceback
        queue.put((rank, "error", traceback.format_exc()))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/dist_harness.py: leave without interpreter finalisation (a gloo abort seen there)


def run_job(job: Job, *, timeout_s: float) -> list[dict]:
    """Run ``job`` on ``job.world`` CPU processes (gloo, one thread each); every rank's timings.

    Raises RuntimeError with the failing ranks' tracebacks, or when ranks outlive ``timeout_s``.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, job, port, queue), daemon=True) for r in range(job.world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    results: dict[int, tuple[str, object]] = {}
    while len(results) < job.world and time.monotonic() < deadline:
        if not queue.empty():
            r, status, value = queue.get()
            results[r] = (status, value)
            if status == "error":
                break
        elif not any(p.is_alive() for p in procs) and queue.empty():
            break
        else:
            time.sleep(0.05)
    for p in procs:
        p.join(max(0.0, min(5.0, deadline - time.monotonic())))
        if p.is_alive():
            p.kill()
    errors = [f"rank {r}:\n{v}" for r, (s, v) in sorted(results.items()) if s == "error"]
    if errors:
        raise RuntimeError(f"{job.model} on {job.world} ranks failed:\n" + "\n".join(errors))
    if len(results) < job.world:
        raise RuntimeError(f"{job.model} on {job.world} ranks: {job.world - len(results)} rank(s) gave no result "
                           f"within {timeout_s:.0f} s (killed)")
    return [results[r][1] for r in range(job.world)]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
