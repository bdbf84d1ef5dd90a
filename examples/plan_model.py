"""Plan a built-in model (or a factory) on a described cluster and print the plan.

    python examples/plan_model.py llama-7b 8xH100-80GB
    python examples/plan_model.py gpt2 8xA100-80GB --json plan.json
"""

from __future__ import annotations

import argparse

import fxshard
from fxshard.zoo import resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a zoo name (mlp, resnet, unet, gpt2, llama-7b, ...) or file.py:factory")
    parser.add_argument("devices", help="a cluster such as 8xA100-80GB, 2x8xH100-80GB or 4xcpu:2GB")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--inference", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    args = parser.parse_args()
    built = resolve(args.model, batch_size=args.batch_size)
    plan = fxshard.plan(built.model, args.devices, built.example_inputs, training=not args.inference, name=built.name)
    print(plan)
    for alt in plan.alternatives[1:6]:
        where = f"{alt.stages} stage(s) x {alt.replicas}" + (f", {alt.schedule}" if alt.schedule else "")
        where += f", m={alt.microbatches}" if alt.microbatches > 1 else ""
        where += f", {alt.data_parallel}" if alt.data_parallel else ""
        where += f", {alt.activation_checkpointing} checkpointing" if alt.activation_checkpointing != "none" else ""
        print(f"  alternative: {alt.strategy} ({where}): "
              + (f"{alt.samples_per_s:.1f} samples/s" if alt.fits else f"does not fit: {alt.note}"))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(plan.to_json())


if __name__ == "__main__":
    main()
