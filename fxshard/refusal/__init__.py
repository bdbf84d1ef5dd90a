"""Why no plan fits, in numbers, and the ways out, each one checked by planning it.

When every candidate overflows a device, the planner hands this package the request, the
model's memory needs and a *probe*: a function that runs the planner's own search on another
cluster, batch or set of options, with the arithmetic that accepts a plan (memory reserve,
whole nodes per stage, the schedule's activations in flight, optimizer bytes). A way out is
offered only when its probe returned a plan (``ways_out.py``: one function of a shared
:class:`~fxshard.refusal.context.Context` per way out, listed in ``WAYS``). The floors the message states
("at least N devices") are lower bounds from the same accounting (``floors.py``:
:func:`pipeline_floor`).

The ways out travel as data on the error, ``error.ways_out`` (a tuple of :class:`WayOut`), so
a program (or a test) can follow them. See docs/planning.md ("When nothing fits").
"""

from fxshard.refusal.floors import Floor, Needs, model_needs, needs_of, pipeline_floor, replica_samples
from fxshard.refusal.records import Accepted, NeedsFn, Probe, ProbeFn, Request, WayOut
from fxshard.refusal.ways_out import refuse

__all__ = ["Accepted", "Floor", "Needs", "NeedsFn", "Probe", "ProbeFn", "Request", "WayOut", "model_needs",
           "needs_of", "pipeline_floor", "refuse", "replica_samples"]
