"""Runtimes: run a plan in one process (local devices) or under torchrun (one stage per rank)."""

from fxshard.runtime.local import LocalPipeline, split_microbatches

__all__ = ["LocalPipeline", "split_microbatches"]
