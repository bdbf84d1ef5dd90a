"""The plan in words: the memory levers (sharding, activation checkpointing, gradient
accumulation) in str(plan), per stage and at the top."""

from __future__ import annotations

import dataclasses

import pytest

from fxshard.plan import Plan


def checkpointed(plan: Plan, *policies: str) -> tuple:
    """The plan's stages with these checkpointing policies (the last repeated)."""
    return tuple(dataclasses.replace(s, activation_checkpointing=policies[min(i, len(policies) - 1)])
                 for i, s in enumerate(plan.stages))


@pytest.fixture(scope="module")
def fsdp(single):
    """gpt2-tiny as 4 FSDP shards, full checkpointing, 4 micro-batches accumulated (hand-made)."""
    return dataclasses.replace(single, strategy="fsdp", data_parallel="fsdp", replicas=4, microbatches=4,
                               stages=checkpointed(single, "full"))


def test_fsdp_plan_says_its_levers(fsdp):
    first, *rest = str(fsdp).splitlines()
    assert first.startswith("fxshard plan: fsdp (4 FSDP shards), full activation checkpointing, "
                            "4 micro-batches accumulated, reshard after forward, partitioner ")
    assert rest[2].endswith(", full activation checkpointing")  # stage 0's line


def test_kept_gathered_is_said(fsdp):
    kept = dataclasses.replace(fsdp, reshard_after_forward=False)
    assert "parameters kept gathered from forward to backward" in str(kept)


def test_plain_plans_say_no_levers(single, pipe):
    assert single.levers_text() == "" and pipe.levers_text() == ""
    said = [line for line in str(pipe).splitlines() if "why:" not in line]  # the reason may name alternatives'
    assert not any("activation checkpointing" in line or "accumulated" in line for line in said)
    assert f"{pipe.microbatches} micro-batches, partitioner" in said[0]


def test_stages_that_differ_are_named(pipe):
    mixed = dataclasses.replace(pipe, stages=checkpointed(pipe, "full", "full", "none", "selective"))
    assert mixed.levers_text() == ("activation checkpointing full on stages 0-1, none on stage 2, "
                                   "selective on stage 3")
    stage_lines = [line for line in str(mixed).splitlines() if line.startswith("  stage ")]
    assert [line.endswith("activation checkpointing") for line in stage_lines] == [True, True, False, True]


def test_hybrid_fsdp_shape_and_levers(pipe):
    hybrid = dataclasses.replace(pipe, strategy="hybrid", data_parallel="fsdp", replicas=2,
                                 stages=checkpointed(pipe, "selective"))
    text = str(hybrid)
    assert "x 2 FSDP shards" in text and "selective activation checkpointing" in text
    assert "accumulated" not in text  # a pipeline's micro-batches are its schedule's, not accumulation
    assert Plan.from_json(hybrid.to_json()) == hybrid
