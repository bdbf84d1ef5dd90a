"""Train a small GPT-2 with an fxshard pipeline under torchrun (CPU with gloo, or GPUs with NCCL).

    torchrun --nproc-per-node 2 examples/train_pipeline.py --steps 3 --checkpoint ckpt.pt
    torchrun --nproc-per-node 3 examples/train_pipeline.py --steps 2 --resume ckpt.pt

Every rank builds the same model from the same seed, compiles it for the world size, and
trains its own stage; the last stage prints the loss. The plan is printed once by rank 0.
A checkpoint holds the model and optimizer state under the original parameter names and the
step count, so it resumes on any number of ranks (above: 2 stages, then 3).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxshard
from fxshard.runtime.distributed import init_process_group_from_env, rank_device
from fxshard.zoo import build


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoint", metavar="PATH", help="save model, optimizer and step here at the end")
    parser.add_argument("--resume", metavar="PATH", help="start from this checkpoint (any number of ranks)")
    args = parser.parse_args()

    init_process_group_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device()
    zoo_model = build(args.model, batch_size=args.batch_size, seed=0)
    model, (tokens,) = zoo_model.model, zoo_model.example_inputs
    target = torch.roll(tokens, shifts=-1, dims=1)  # next-token prediction on a fixed batch

    devices = f"{world}x{'cpu:4GB' if device.type == 'cpu' else 'H100-80GB'}"
    # example_target prices the loss on the last stage (its shapes only)
    compiled = fxshard.compile(model, devices, (tokens,), strategy="pipeline", schedule=args.schedule,
                               microbatches=args.microbatches, loss_fn=lm_loss, example_target=target)
    if rank == 0:
        print(compiled.plan, flush=True)
    optimizer = torch.optim.AdamW(compiled.parameters(), lr=args.lr)
    start = 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
        compiled.load_state_dict(ckpt["model"])
        compiled.load_optimizer_state_dict(optimizer, ckpt["optimizer"])
        start = ckpt["step"]
        if rank == 0:
            print(f"resumed at step {start} from a {ckpt['stages']}-stage run", flush=True)
    for step in range(start, start + args.steps):
        optimizer.zero_grad()
        loss = compiled.step(tokens, target=target)
        optimizer.step()
        if loss is not None:
            print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)
    state = compiled.state_dict(gather=True)
    optim_state = compiled.optimizer_state_dict(optimizer, gather=True)
    if rank == 0:
        print(f"checkpoint holds {len(state)} tensors under the original names", flush=True)
        if args.checkpoint:
            torch.save({"model": state, "optimizer": optim_state, "step": start + args.steps,
                        "stages": compiled.plan.num_stages}, args.checkpoint)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
