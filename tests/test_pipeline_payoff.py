"""benchmarks/pipeline_payoff.py: the splits it compares are the ones it says, the hand-written
stages compute the model, and its quick run measures every side (no assertion on speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _payoff_worker as w
import pipeline_payoff as payoff

from fxshard.capture import capture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gpt2", "llama", "resnet"])
def captured(request):
    mc = w.case(request.param, quick=True)
    model, x, _ = mc.build()
    return mc, model, x, capture(model, (x,))


def test_every_node_has_one_piece_in_model_order(captured):
    mc, _, _, cap = captured
    pieces = w.pieces_of(cap.gm, mc)
    assert list(pieces) == [n.name for n in cap.gm.graph.nodes]
    order = w.piece_order(pieces)
    blocks = [p for p in order if p.startswith(mc.blocks + ".")]
    assert blocks == [f"{mc.blocks}.{i}" for i in range(len(blocks))] and len(blocks) >= 2
    # A piece's nodes are contiguous in graph order, so every split in pieces is a pipeline.
    runs = [p for i, p in enumerate(pieces.values()) if i == 0 or p != list(pieces.values())[i - 1]]
    assert runs == order


def test_equal_split_counts_blocks():
    order = ["embed", *[f"h.{i}" for i in range(8)], "ln_f", "lm_head"]
    assert w.equal_split(order, "h", 2) == ["h.4"]
    assert w.equal_split(order, "h", 4) == ["h.2", "h.4", "h.6"]
    assert w.equal_split(order, "h", 3) == ["h.3", "h.6"]  # 3, 3, 2 blocks
    stage = w.stage_of_pieces(order, ["h.4"])
    assert [stage[p] for p in order] == [0] * 5 + [1] * 6
    with pytest.raises(ValueError, match="8 blocks cannot be split into 9"):
        w.equal_split(order, "h", 9)


def test_explicit_plan_prices_the_given_split(captured):
    mc, model, x, cap = captured
    pieces = w.pieces_of(cap.gm, mc)
    order = w.piece_order(pieces)
    starts = w.equal_split(order, mc.blocks, 2)
    by_piece = w.stage_of_pieces(order, starts)
    wanted = {n: by_piece[p] for n, p in pieces.items()}
    plan = payoff.explicit_plan(model, x, "2xcpu:16GB", wanted, strategy="pipeline", stages=2, schedule="1f1b",
                                microbatches=2, activation_checkpointing="none")
    assert plan.num_stages == 2 and plan.estimate.step_time_s > 0
    assert {n: s for n, s in plan.stage_of().items() if n in wanted} == {n: s for n, s in wanted.items()
                                                                          if n in plan.stage_of()}
    assert payoff.translate(plan, pieces, order) == (starts, True)
    assert payoff._SPLIT_NAME not in __import__("fxshard").partitioners()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hand_written_stages_compute_the_model(name):
    mc = w.case(name, quick=True)
    model, x, _ = mc.build()
    names = w.GPT2_NAMES if name == "gpt2" else w.LLAMA_NAMES
    order = ["embed", *[f"{mc.blocks}.{i}" for i in range(4)], names["norm"], names["head"]]
    for starts in (["h.1"], ["h.2", "ln_f"]) if name == "gpt2" else (["layers.3"], ["layers.1", "output"]):
        stage = w.stage_of_pieces(order, starts)
        parts = [w.HandStage(model, mc.hand, [p for p in order if stage[p] == s]) for s in range(len(starts) + 1)]
        out = x
        for part in parts:
            out = part(out)
        torch.testing.assert_close(out, model(x))
        assert {id(p) for part in parts for p in part.parameters()} == {id(p) for p in model.parameters()}


@pytest.mark.slow
def test_quick_run_measures_every_side(tmp_path):
    out = tmp_path / "payoff.json"
    md = tmp_path / "payoff.md"
    rows = payoff.main(["--quick", "--models", "gpt2", "--json", str(out), "--md", str(md)])
    assert [(r["model"], r["ranks"]) for r in rows] == [("gpt2", 2)]
    measured = rows[0]["measured"]
    assert {"fxshard", "upstream", "hand"} <= set(measured)
    for side in measured.values():
        assert len(side["steps_s"]) == 2 and side["step_s"] > 0 and side["busiest_cpu_per_wall"] > 0
    assert rows[0]["predicted"]["fxshard"] > 0 and rows[0]["predicted"]["upstream"] > 0
    assert json.loads(out.read_text())["rows"][0]["equal_split"] == rows[0]["equal_split"]
    text = md.read_text()
    assert "| gpt2 | 2 |" in text and "hand-written" in text
