"""The schedule simulator: torch's own action orders, timed.

Closed forms for equal stages (the bubble of GPipe / 1F1B / interleaved 1F1B), per-stage
memory under each schedule, transfer and all-reduce times, timeline invariants, the Chrome
trace, and the errors for sizes a schedule refuses."""

from __future__ import annotations

import collections
import itertools
import json
import math

import pytest

from fxshard.errors import FxshardError
from fxshard.simulate import (
    SCHEDULES,
    SimResult,
    SimulationError,
    StageTiming,
    rank_actions,
    schedule_name,
    simulate,
    to_chrome_trace,
)

F, B = 1.0, 2.0  # forward / backward seconds per micro-batch of one equal stage


def equal(n: int, **kw) -> list[StageTiming]:
    return [StageTiming(fwd_s=F, bwd_s=B, **kw)] * n


def gpipe_bubble(p: int, m: int) -> float:
    return (p - 1) / (m + p - 1)


def check_invariants(r: SimResult) -> None:
    """Every rank is busy + idle for exactly the step, and nothing overlaps on one rank."""
    assert len(r.busy_s) == len(r.idle_s) == r.ranks
    for rank in range(r.ranks):
        assert r.busy_s[rank] + r.idle_s[rank] == pytest.approx(r.step_time_s, rel=1e-12, abs=1e-12)
        assert r.idle_s[rank] >= -1e-12
        acts = sorted((a for a in r.timeline if a.rank == rank), key=lambda a: a.start)
        assert sum(a.end - a.start for a in acts) == pytest.approx(r.busy_s[rank], rel=1e-12, abs=1e-12)
        for prev, nxt in itertools.pairwise(acts):
            assert prev.end <= nxt.start + 1e-12, f"rank {rank} runs {prev} and {nxt} at once"
    assert all(a.start >= 0 and a.end >= a.start for a in r.timeline)
    assert max(a.end for a in r.timeline) == pytest.approx(r.step_time_s)
    assert r.bubble_fraction == pytest.approx(sum(r.idle_s) / (r.ranks * r.step_time_s))


# -- closed forms with equal stages ----------------------------------------------------------


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(1, 1), (1, 4), (2, 2), (2, 4), (2, 7), (3, 3), (3, 5), (4, 4), (4, 8), (4, 16),
                                 (8, 8), (8, 12)])
def test_equal_stages_bubble_and_step_closed_form(schedule, p, m):
    r = simulate(schedule, equal(p), m)
    assert (r.ranks, r.stages, r.microbatches) == (p, p, m)
    # Exact: the simulator adds and compares small integers only.
    assert r.bubble_fraction == pytest.approx(gpipe_bubble(p, m), rel=1e-12, abs=1e-15)
    assert r.step_time_s == pytest.approx((m + p - 1) * (F + B), rel=1e-12)
    assert r.busy_s == pytest.approx([m * (F + B)] * p)
    check_invariants(r)


@pytest.mark.parametrize("p,m", [(2, 1), (3, 2), (4, 2), (5, 3)])
def test_gpipe_accepts_fewer_microbatches_than_stages(p, m):
    r = simulate("gpipe", equal(p), m)
    assert r.bubble_fraction == pytest.approx(gpipe_bubble(p, m), rel=1e-12)
    assert r.step_time_s == pytest.approx((m + p - 1) * (F + B))


@pytest.mark.parametrize("p,m", [(2, 2), (2, 3), (2, 4), (3, 3), (3, 6), (4, 4), (4, 8)])
def test_interleaved_1f1b_bubble_formula(p, m):
    v = SCHEDULES["interleaved1f1b"][1]
    assert v == 2
    # Each of the v*p virtual stages takes (f, b), so a rank does v*m*(f+b) of work.
    r = simulate("interleaved1f1b", equal(v * p), m)
    assert (r.ranks, r.stages) == (p, v * p)
    assert r.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), rel=1e-12)
    assert r.step_time_s == pytest.approx((v * m + p - 1) * (F + B), rel=1e-12)
    check_invariants(r)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 4), (4, 8)])
def test_interleaved_beats_1f1b_for_same_work(p, m):
    plain = simulate("1f1b", equal(p), m)
    half = [StageTiming(fwd_s=F / 2, bwd_s=B / 2)] * (2 * p)
    inter = simulate("interleaved1f1b", half, m)
    assert inter.bubble_fraction < plain.bubble_fraction
    assert inter.step_time_s < plain.step_time_s


@pytest.mark.parametrize("schedule", ["zbv", "interleavedzb"])
@pytest.mark.parametrize("p,m", [(2, 2), (2, 4), (4, 4), (4, 8)])
def test_zero_bubble_schedules_have_a_smaller_bubble_than_1f1b(schedule, p, m):
    plain = simulate("1f1b", equal(p), m)
    # The same work per rank, split over two virtual stages per rank.
    zb = simulate(schedule, [StageTiming(fwd_s=F / 2, bwd_s=B / 2)] * (2 * p), m)
    assert zb.ranks == p
    assert zb.bubble_fraction < plain.bubble_fraction
    assert zb.step_time_s < plain.step_time_s
    assert sum(zb.busy_s) == pytest.approx(sum(plain.busy_s))
    check_invariants(zb)
    assert {a.kind for a in zb.timeline} >= {"F", "I", "W"}


# -- memory under a schedule -----------------------------------------------------------------


@pytest.mark.parametrize("p,m", [(2, 2), (3, 6), (4, 4), (4, 9)])
def test_peak_inflight_gpipe_is_all_microbatches(p, m):
    r = simulate("gpipe", equal(p), m)
    assert r.peak_inflight == (m,) * p


@pytest.mark.parametrize("p,m", [(2, 2), (2, 5), (3, 6), (4, 4), (4, 9), (6, 6)])
def test_peak_inflight_1f1b_is_p_minus_stage(p, m):
    r = simulate("1f1b", equal(p), m)
    assert r.peak_inflight == tuple(min(p - s, m) for s in range(p))


@pytest.mark.parametrize("schedule,p,m", [("interleaved1f1b", 2, 4), ("interleaved1f1b", 4, 8), ("zbv", 3, 6),
                                          ("loopedbfs", 2, 4)])
def test_peak_inflight_follows_torchs_action_order(schedule, p, m):
    """Multi-stage schedules: replay torch's per-rank order, forward adds, backward frees."""
    r = simulate(schedule, equal(2 * p), m)
    held = collections.Counter()
    peak = collections.Counter()
    for actions in rank_actions(schedule, p, m):
        for s, kind, _ in actions:
            if kind == "F":
                held[s] += 1
                peak[s] = max(peak[s], held[s])
            elif kind in ("B", "W"):  # a split backward frees after its weight gradient
                held[s] -= 1
    assert tuple(peak[s] for s in range(2 * p)) == r.peak_inflight
    assert all(1 <= k <= m for k in r.peak_inflight)
    assert r.peak_inflight[0] >= r.peak_inflight[-1]
    if schedule == "loopedbfs":  # breadth-first: every micro-batch forward before any backward
        assert r.peak_inflight == (m,) * (2 * p)


@pytest.mark.parametrize("schedule,n", [("gpipe", 3), ("1f1b", 3), ("interleaved1f1b", 4), ("zbv", 4)])
def test_peak_memory_is_static_plus_inflight_activations_plus_transient(schedule, n):
    stages = [StageTiming(fwd_s=F, bwd_s=B, activation_bytes=100.0 * (s + 1), static_bytes=1000.0 * (s + 1),
                          transient_bytes=7.0) for s in range(n)]
    r = simulate(schedule, stages, 4)
    for s, t in enumerate(stages):
        assert r.peak_memory_bytes[s] == pytest.approx(t.static_bytes + r.peak_inflight[s] * t.activation_bytes
                                                       + t.transient_bytes)


def test_1f1b_holds_less_than_gpipe():
    stages = [StageTiming(fwd_s=F, bwd_s=B, activation_bytes=10.0, static_bytes=5.0)] * 4
    g = simulate("gpipe", stages, 8)
    o = simulate("1f1b", stages, 8)
    assert all(a < b for a, b in zip(o.peak_memory_bytes, g.peak_memory_bytes))
    assert o.peak_memory_bytes[0] == pytest.approx(5 + 4 * 10)
    assert g.peak_memory_bytes[0] == pytest.approx(5 + 8 * 10)


# -- transfers, unequal stages, all-reduce ---------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("c", [0.25, 3.0])
def test_transfer_times_lengthen_a_two_stage_gpipe(m, c):
    base = simulate("gpipe", equal(2), m)
    both = simulate("gpipe", [StageTiming(fwd_s=F, bwd_s=B, send_fwd_s=c, send_bwd_s=c), equal(1)[0]], m)
    fwd_only = simulate("gpipe", [StageTiming(fwd_s=F, bwd_s=B, send_fwd_s=c), equal(1)[0]], m)
    bwd_only = simulate("gpipe", [StageTiming(fwd_s=F, bwd_s=B, send_bwd_s=c), equal(1)[0]], m)
    # One hop forward and one hop back sit on the critical path.
    assert both.step_time_s == pytest.approx(base.step_time_s + 2 * c)
    assert fwd_only.step_time_s == pytest.approx(base.step_time_s + c)
    assert bwd_only.step_time_s == pytest.approx(base.step_time_s + c)
    assert both.busy_s == pytest.approx(base.busy_s)  # transfers are not compute
    check_invariants(both)


def test_send_on_the_last_stage_changes_nothing():
    base = simulate("1f1b", equal(3), 6)
    last = simulate("1f1b", equal(2) + [StageTiming(fwd_s=F, bwd_s=B, send_fwd_s=9.0, send_bwd_s=9.0)], 6)
    assert last.step_time_s == pytest.approx(base.step_time_s)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("times", [[(1, 2), (3, 1), (0.5, 0.5)], [(2, 4), (1, 2), (1, 2), (0.1, 0.2)],
                                   [(1, 1), (5, 5)]])
@pytest.mark.parametrize("m", [4, 8])
def test_unequal_stages_step_bounded_below_by_the_slowest(schedule, times, m):
    stages = [StageTiming(fwd_s=f, bwd_s=b) for f, b in times]
    r = simulate(schedule, stages, m)
    slowest = max(f + b for f, b in times)
    assert r.step_time_s >= m * slowest - 1e-9
    assert r.step_time_s >= sum(f + b for f, b in times) - 1e-9  # one micro-batch crosses every stage
    # and no worse than running everything one after the other
    assert r.step_time_s <= m * sum(f + b for f, b in times) + 1e-9
    for s, (f, b) in enumerate(times):
        assert r.busy_s[s] == pytest.approx(m * (f + b))
    check_invariants(r)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_reduce_adds_to_the_step(schedule):
    base = simulate(schedule, equal(2), 4)
    r = 0.75
    reduced = simulate(schedule, equal(2, reduce_s=r), 4)
    # The last rank to finish (stage 0, its last backward) all-reduces after it.
    assert reduced.step_time_s == pytest.approx(base.step_time_s + r)
    kinds = collections.Counter(a.kind for a in reduced.timeline)
    assert kinds["R"] == 2
    for a in reduced.timeline:
        if a.kind == "R":
            assert a.end - a.start == pytest.approx(r)
            assert a.microbatch == -1
            ends = [x.end for x in reduced.timeline if x.rank == a.rank and x.kind != "R"]
            assert a.start >= max(ends) - 1e-12
    assert reduced.busy_s == pytest.approx([b + r for b in base.busy_s])
    check_invariants(reduced)


def test_reduce_on_one_stage_only():
    base = simulate("gpipe", equal(2), 4)
    on_first = simulate("gpipe", [StageTiming(fwd_s=F, bwd_s=B, reduce_s=1.5), equal(1)[0]], 4)
    assert on_first.step_time_s == pytest.approx(base.step_time_s + 1.5)


# -- the order is torch's, and every action runs once --------------------------------------------


@pytest.mark.parametrize("schedule,p,m", [("gpipe", 3, 5), ("1f1b", 4, 6), ("interleaved1f1b", 2, 4),
                                          ("loopedbfs", 2, 3), ("interleavedzb", 3, 6), ("zbv", 2, 4)])
def test_every_action_of_torchs_order_appears_once(schedule, p, m):
    per_rank = SCHEDULES[schedule][1]
    orders = rank_actions(schedule, p, m)
    assert len(orders) == p
    r = simulate(schedule, equal(p * per_rank), m)
    expected = collections.Counter((rank, s, kind, i) for rank, acts in enumerate(orders) for s, kind, i in acts)
    got = collections.Counter((a.rank, a.stage, a.kind, a.microbatch) for a in r.timeline)
    assert got == expected
    assert max(expected.values()) == 1
    # Each rank runs its actions in torch's order.
    for rank, acts in enumerate(orders):
        mine = sorted((a for a in r.timeline if a.rank == rank), key=lambda a: a.start)
        assert [(a.stage, a.kind, a.microbatch) for a in mine] == list(acts)
    # Each stage runs each micro-batch forward once and backward once (whole or split in I + W).
    for s in range(p * per_rank):
        for i in range(m):
            kinds = sorted(a.kind for a in r.timeline if a.stage == s and a.microbatch == i)
            assert kinds in (["B", "F"], ["F", "I", "W"])
    check_invariants(r)


def test_dependencies_hold_in_the_timeline():
    c = 0.3
    stages = [StageTiming(fwd_s=1.0 + s / 10, bwd_s=2.0, send_fwd_s=c, send_bwd_s=c) for s in range(3)]
    r = simulate("1f1b", stages, 5)
    at = {(a.stage, a.kind, a.microbatch): a for a in r.timeline}
    for (s, kind, i), a in at.items():
        if kind == "F" and s > 0:
            assert a.start >= at[(s - 1, "F", i)].end + c - 1e-12
        if kind == "B":
            assert a.start >= at[(s, "F", i)].end - 1e-12
            if s < 2:
                assert a.start >= at[(s + 1, "B", i)].end + c - 1e-12


def test_1f1b_order_is_one_forward_one_backward_in_steady_state():
    orders = rank_actions("1f1b", 4, 8)
    first = orders[0]
    assert [k for _, k, _ in first[:4]] == ["F"] * 4  # warm-up: p - s forwards
    assert [k for _, k, _ in first[4:8]] == ["B", "F", "B", "F"]
    last = orders[3]
    assert [k for _, k, _ in last[:4]] == ["F", "B", "F", "B"]
    gpipe = rank_actions("gpipe", 4, 8)
    assert [k for _, k, _ in gpipe[0]] == ["F"] * 8 + ["B"] * 8


# -- Chrome trace ----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,n", [("1f1b", 3), ("zbv", 4)])
def test_chrome_trace(schedule, n):
    r = simulate(schedule, equal(n, reduce_s=0.1), 4)
    data = json.loads(to_chrome_trace(r))
    events = data["traceEvents"]
    xs = [e for e in events if e["ph"] == "X"]
    assert len(xs) == len(r.timeline)
    for e, a in zip(sorted(xs, key=lambda e: (e["ts"], e["tid"])), sorted(r.timeline, key=lambda a: (a.start, a.rank))):
        assert e["tid"] == a.rank
        assert e["ts"] == pytest.approx(a.start * 1e6)
        assert e["dur"] == pytest.approx((a.end - a.start) * 1e6)
        assert e["dur"] >= 0
    threads = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert set(threads) == set(range(r.ranks))
    assert all(f"{rank}" in name for rank, name in threads.items())
    assert {e["tid"] for e in xs} == set(range(r.ranks))
    assert any(e["name"] == "process_name" for e in events)


def test_action_label_reads_like_torch():
    r = simulate("gpipe", equal(2, reduce_s=0.1), 2)
    labels = {a.label() for a in r.timeline}
    assert {"0F0", "1F1", "0B1", "1B0"} <= labels
    assert "0R" in labels


# -- errors ----------------------------------------------------------------------------------


def test_simulation_error_is_an_fxshard_error():
    assert issubclass(SimulationError, FxshardError)


def test_unknown_schedule():
    with pytest.raises(SimulationError, match=r"unknown schedule 'chimera'.*gpipe"):
        simulate("chimera", equal(2), 4)
    with pytest.raises(SimulationError, match="unknown schedule"):
        rank_actions("pipedream", 2, 4)


def test_schedule_names_are_forgiving_about_case_and_dashes():
    a = simulate("Interleaved-1F1B", equal(4), 4)
    b = simulate("interleaved1f1b", equal(4), 4)
    assert a.step_time_s == b.step_time_s
    assert a.schedule == "interleaved1f1b"  # results carry the one canonical name


# -- one spelling rule for every entry point (issue 12, item 12) ---------------------------------

SPELLINGS = [
    ("gpipe", "gpipe"), ("GPipe", "gpipe"), ("ScheduleGPipe", "gpipe"),
    ("1F1B", "1f1b"), ("Schedule1F1B", "1f1b"),
    ("interleaved-1f1b", "interleaved1f1b"), ("Interleaved1F1B", "interleaved1f1b"),
    ("interleaved_1f1b", "interleaved1f1b"), ("ScheduleInterleaved1F1B", "interleaved1f1b"),
    ("ZBVZeroBubble", "zbv"), ("zero-bubble-v", "zbv"), ("ZBV", "zbv"),
    ("InterleavedZeroBubble", "interleavedzb"), ("interleaved zero bubble", "interleavedzb"),
    ("LoopedBFS", "loopedbfs"), ("looped-bfs", "loopedbfs"),
]


@pytest.mark.parametrize("spelling,name", SPELLINGS)
def test_schedule_name_spellings(spelling, name):
    assert schedule_name(spelling) == name
    assert schedule_name(name) == name
    assert schedule_name(SCHEDULES[name][0]) == name  # torch's own class name maps back


@pytest.mark.parametrize("bad", ["1f2b", "schedule", "", "gpipe2", "zero-bubble"])
def test_schedule_name_refuses_unknown_names(bad):
    with pytest.raises(SimulationError, match=r"unknown schedule .*gpipe, 1f1b, interleaved1f1b.*Interleaved1F1B"):
        schedule_name(bad)
    with pytest.raises(SimulationError, match="is a int"):
        schedule_name(5)


@pytest.fixture(scope="module")
def small_mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*[layer for _ in range(4) for layer in (nn.Linear(16, 16), nn.ReLU())])
    return model, (torch.randn(8, 16),)


@pytest.fixture(scope="module")
def small_mlp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("factory") / "small_mlp.py"
    path.write_text("import torch\n"
                    "from torch import nn\n"
                    "def make():\n"
                    "    torch.manual_seed(0)\n"
                    "    layers = [layer for _ in range(4) for layer in (nn.Linear(16, 16), nn.ReLU())]\n"
                    "    return nn.Sequential(*layers), (torch.randn(8, 16),)\n")
    return f"{path}:make"


def test_every_spelling_through_every_entry_point(small_mlp, small_mlp_file, tmp_path, capsys):
    """``plan``, ``compile``, ``simulate``, ``simulate_plan`` and the CLI's ``plan`` and ``simulate``
    take every spelling; "interleaved-1f1b" used to work in ``simulate`` and fail in ``plan``."""
    import fxshard
    from fxshard.cli import main
    from fxshard.plan import Plan
    from fxshard.simulate_plan import simulate_plan

    model, inputs = small_mlp
    fixed = {"strategy": "pipeline", "stages": 2, "microbatches": 4}
    plans = {}
    for spelling, name in SPELLINGS:
        p = fxshard.plan(model, "2xcpu:1GB", inputs, schedule=spelling, **fixed)
        assert p.schedule == name, spelling
        plans.setdefault(name, p)
        assert fxshard.compile(model, "2xcpu:1GB", inputs, schedule=spelling, **fixed).plan.schedule == name
        per_rank = SCHEDULES[name][1]
        assert simulate(spelling, equal(2 * per_rank), 4).schedule == name
        assert rank_actions(spelling, 2, 4) == rank_actions(name, 2, 4)
        assert simulate_plan(plans[name], schedule=spelling).schedule == name
        assert main(["plan", small_mlp_file, "--devices", "2xcpu:1GB", "--strategy", "pipeline", "--stages", "2",
                     "--microbatches", "4", "--schedule", spelling, "--json", "-"]) == 0, spelling
        assert json.loads(capsys.readouterr().out)["schedule"] == name
        saved = tmp_path / f"{name}.json"
        saved.write_text(plans[name].to_json())
        assert Plan.from_json(saved.read_text()).schedule == name
        assert main(["simulate", str(saved), "--schedule", spelling]) == 0, spelling
        assert capsys.readouterr().out.split(": ", 1)[1].startswith(name + ",")


@pytest.mark.parametrize("p,m", [(4, 3), (3, 2), (8, 1)])
def test_1f1b_needs_at_least_p_microbatches(p, m):
    with pytest.raises(SimulationError) as e:
        simulate("1f1b", equal(p), m)
    msg = str(e.value)
    assert "1f1b" in msg and str(p) in msg and str(m) in msg


@pytest.mark.parametrize("schedule,n", [("interleaved1f1b", 3), ("zbv", 5), ("loopedbfs", 1), ("interleavedzb", 7)])
def test_stages_must_divide_by_stages_per_rank(schedule, n):
    with pytest.raises(SimulationError, match=rf"{schedule} runs 2 stages per rank; {n} stages"):
        simulate(schedule, equal(n), 4)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_no_stages_or_no_microbatches(schedule):
    with pytest.raises(SimulationError, match="at least one rank and one micro-batch"):
        simulate(schedule, equal(2), 0)
    with pytest.raises(SimulationError, match="at least one rank"):
        simulate(schedule, [], 4)


def test_simulate_is_deterministic():
    stages = [StageTiming(fwd_s=0.1 * (s + 1), bwd_s=0.3, send_fwd_s=0.01, send_bwd_s=0.02) for s in range(4)]
    a = simulate("interleaved1f1b", stages, 6)
    b = simulate("interleaved1f1b", stages, 6)
    assert a == b
    assert to_chrome_trace(a) == to_chrome_trace(b)
    assert math.isfinite(a.step_time_s)
