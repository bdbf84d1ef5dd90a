"""Train a small GPT-2 with an fxshard pipeline under torchrun (CPU with gloo, or GPUs with NCCL).

    torchrun --nproc-per-node 2 examples/train_pipeline.py --steps 5

Every rank builds the same model from the same seed, compiles it for the world size, and
trains its own stage; the last stage prints the loss. The plan is printed once by rank 0.
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
    args = parser.parse_args()

    init_process_group_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device()
    zoo_model = build(args.model, batch_size=args.batch_size, seed=0)
    model, (tokens,) = zoo_model.model, zoo_model.example_inputs
    target = torch.roll(tokens, shifts=-1, dims=1)  # next-token prediction on a fixed batch

    devices = f"{world}x{'cpu:4GB' if device.type == 'cpu' else 'H100-80GB'}"
    compiled = fxshard.compile(model, devices, (tokens,), strategy="pipeline", schedule=args.schedule,
                               microbatches=args.microbatches, loss_fn=lm_loss)
    if rank == 0:
        print(compiled.plan, flush=True)
    optimizer = torch.optim.AdamW(compiled.parameters(), lr=args.lr)
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = compiled.step(tokens, target=target)
        optimizer.step()
        if loss is not None:
            print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)
    state = compiled.state_dict(gather=True)
    if rank == 0:
        print(f"checkpoint holds {len(state)} tensors under the original names", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
