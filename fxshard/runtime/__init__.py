"""Runtimes: run a plan in one process (local devices) or under torchrun (one stage per rank).

``execution`` is the interface :class:`fxshard.CompiledModel` runs through and picks the
runtime; ``local`` runs stages in one process; ``distributed`` runs this rank's part under
torchrun, with ``stages`` (building them), ``data_parallel`` (replica gradients) and
``failures`` (stopping every rank when one fails). See docs/runtime.md.
"""

from fxshard.runtime.local import LocalPipeline, split_microbatches

__all__ = ["LocalPipeline", "split_microbatches"]
