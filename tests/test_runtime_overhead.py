"""benchmarks/runtime_overhead.py's quick mode: the structure of its rows and files (no speed asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.benchmark_scripts import load


def _script():
    return load("runtime_overhead")


@pytest.mark.slow  # about 4 s alone (capture and plan of a tiny GPT-2), 11 s on a loaded 2-core machine
def test_quick_mode_writes_one_row_per_model(tmp_path):
    threads = torch.get_num_threads()
    assert _script().main(["--quick", "--models", "gpt2", "--md", str(tmp_path / "o.md"),
                           "--json", str(tmp_path / "o.json")]) == 0
    doc = json.loads((tmp_path / "o.json").read_text())
    assert [r["model"] for r in doc["rows"]] == ["gpt2"] and doc["threads"] == 1
    for row in doc["rows"]:
        assert row["rounds"] == 2 and row["microbatches"] == 1
        assert row["eager_s"] > 0 and row["compiled_s"] > 0 and row["ratio"] > 0 and row["cpu_ratio"] > 0
    assert doc["fixed_step_s"]["compiled"] > 0
    assert "throughput ratio" in (tmp_path / "o.md").read_text()
    assert torch.get_num_threads() == threads  # the thread count is restored
