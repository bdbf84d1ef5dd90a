"""The torchrun calibration benchmarks' quick modes: structure only (tiny models, no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # each launches torchrun jobs (~15 s of start-up per plan)


def _run(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_cpu_calibration_quick_reports_every_stage_rank_and_error(tmp_path):
    out = tmp_path / "cal.json"
    _run("cpu_calibration.py", "--models", "gpt2", "resnet", "--json", str(out), "--md", str(tmp_path / "cal.md"))
    data = json.loads(out.read_text())
    assert [(r["model"], r["ranks"]) for r in data["summary"]] == [("gpt2", 2), ("resnet", 2)]
    for row, run in zip(data["summary"], data["runs"]):
        assert "error" not in row, row
        report = run["report"]
        assert [s["index"] for s in report["stages"]] == [0, 1]
        assert all(s["measured_fwd_s"] > 0 and s["measured_bwd_s"] > 0 and s["saved_bytes"] > 0
                   for s in report["stages"])
        assert [r["rank"] for r in report["ranks"]] == [0, 1]
        assert len(row["measured_peak_mib"]) == len(row["predicted_peak_mib"]) == 2
        for key in ("stage_error_analytical", "stage_error_profiled", "step_error_analytical",
                    "step_error_profiled", "memory_error_median", "saved_over_predicted_activations"):
            assert row[key] is not None, key
    assert "| gpt2 | 2 |" in (tmp_path / "cal.md").read_text()


def test_plan_ranking_quick_ranks_every_candidate(tmp_path):
    out = tmp_path / "ranking.json"
    _run("plan_ranking.py", "--json", str(out))
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert len(rows) == 3 and len({r["shape"] for r in rows}) >= 2  # distinct plans
    assert all(r["measured_s"] > 0 and r["analytical_s"] > 0 and r["profiled_s"] > 0 and not r["error"]
               for r in rows)
    pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]]
    for which in ("analytical", "profiled"):
        # tau-a = (concordant - discordant) / pairs: the pairs listed are exactly the discordant ones.
        tau, discordant = data["tau"][which], data["discordant"][which]
        ties = sum(a[f"{which}_s"] == b[f"{which}_s"] or a["measured_s"] == b["measured_s"] for a, b in pairs)
        assert -1 <= tau <= 1
        assert tau == pytest.approx((len(pairs) - ties - 2 * len(discordant)) / len(pairs))
