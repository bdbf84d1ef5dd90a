"""``compare``: which strategies it asks the planner for under the memory levers, and the
levers in its rows and table (the planner stood in by a recorder: compare's part is the rows)."""

from __future__ import annotations

import dataclasses

import pytest

import fxshard
import fxshard.compare
from fxshard.cli_text import compare_table
from fxshard.cluster import Cluster
from fxshard.compare import checkpointing_of, compare
from fxshard.errors import PlanError
from fxshard.planner import PlanOptions


@pytest.fixture(scope="module")
def captured(gpt2):
    return fxshard.capture(gpt2.model, gpt2.example_inputs)


@pytest.fixture
def asked(monkeypatch, pipe, single):
    """The strategies compare asks for, in order; single/ddp/fsdp get a hand-made plan of that
    strategy, pipelines and hybrids the pipe fixture (hybrid refused)."""
    seen = []

    def fake(captured, cluster, batch, opts):
        seen.append(opts.strategy)
        if opts.strategy == "hybrid":
            raise PlanError("no hybrid here")
        if opts.strategy == "pipeline":
            return pipe
        dp = {"single": None}.get(opts.strategy, opts.strategy)
        return dataclasses.replace(single, strategy=opts.strategy, data_parallel=dp,
                                   replicas=1 if dp is None else 4)

    monkeypatch.setattr(fxshard.compare, "plan_captured", fake)
    return seen


@pytest.mark.parametrize("options, strategies", [
    ({}, ["single", "ddp", "fsdp", "pipeline", "hybrid"]),
    ({"data_parallel": "fsdp"}, ["fsdp", "hybrid"]),
    ({"data_parallel": "ddp"}, ["ddp", "hybrid"]),
    ({"strategy": "fsdp"}, ["fsdp"]),
    ({"activation_checkpointing": "full"}, ["single", "ddp", "fsdp", "pipeline", "hybrid"]),
])
def test_strategies_asked_follow_the_levers(asked, captured, options, strategies):
    rows = compare(captured, Cluster.parse("4xcpu:64MB"), 8, PlanOptions(**options), ["metis"])
    assert asked == strategies
    assert sum(r.best for r in rows) == 1


def test_rows_carry_data_parallel_and_checkpointing(asked, captured, capsys):
    rows = [r.to_dict() for r in compare(captured, Cluster.parse("4xcpu:64MB"), 8, PlanOptions(), ["metis"])]
    by = {r["strategy"]: r for r in rows}
    assert by["fsdp"]["data_parallel"] == "fsdp" and by["fsdp"]["reshard_after_forward"] is True
    assert by["ddp"]["data_parallel"] == "ddp" and by["ddp"]["reshard_after_forward"] is None
    assert by["pipeline"]["data_parallel"] is None
    assert {r["activation_checkpointing"] for r in rows} == {"none"}
    rows[0]["activation_checkpointing"] = "full"
    rows[0]["data_parallel"] = "fsdp"
    compare_table(rows, "levers")
    out = capsys.readouterr().out
    assert "levers" in out and "fsdp, full ckpt" in out and "fsdp x4 " in out


def test_checkpointing_of_mixed_stages(pipe):
    assert checkpointing_of(pipe) == "none"
    policies = ("full", "full", "none", "selective")
    mixed = dataclasses.replace(pipe, stages=tuple(dataclasses.replace(s, activation_checkpointing=p)
                                                   for s, p in zip(pipe.stages, policies)))
    assert checkpointing_of(mixed) == "full/full/none/selective"
