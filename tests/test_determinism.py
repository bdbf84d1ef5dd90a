"""Determinism: the same inputs give byte-identical plan JSON, across runs and processes.

Plans use the analytical cost model (the profiled one measures wall-clock time, which varies
run to run by nature; see docs/planning.md). Processes differ in PYTHONHASHSEED, so set and
dict iteration orders that depend on string hashes would show.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fxshard
from fxshard.zoo import build

ROOT = Path(__file__).resolve().parents[1]

# (model, devices, options): pipelines (metis with its seeded randomness), hybrid, DDP, an
# exported graph, a tight budget, inference.
CASES = [
    ("gpt2-tiny", "4xcpu:1GB", {"strategy": "pipeline", "schedule": "interleaved1f1b"}),
    ("llama-tiny", "8xcpu:1GB", {"strategy": "hybrid"}),
    ("resnet", "4xcpu:1GB", {}),
    ("unet", "4xA100-40GB", {}),
    ("gpt2-tiny", "4xcpu:3MB", {}),
    ("gpt2", "8xA100-80GB", {}),
    ("llama-7b", "8xH100-80GB", {"training": False}),
]


def _plan_json(name: str, devices: str, options: dict) -> str:
    z = build(name, batch_size=8, seed=0) if name.endswith("-tiny") else build(name, seed=0)
    return fxshard.plan(z.model, devices, z.example_inputs, **options).to_json()


_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from tests.test_determinism import CASES, _plan_json
for name, devices, options in CASES:
    sys.stdout.write(_plan_json(name, devices, options) + "\\n<<END>>\\n")
"""


def _in_subprocess(hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT.format(root=str(ROOT))], capture_output=True, text=True,
                            env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("\n<<END>>\n")[:-1]


@pytest.mark.parametrize("name,devices,options", [  # full-size models are slow; the tiny ones stay in the fast lane
    pytest.param(*case, id=case[0], marks=() if case[0].endswith("-tiny") else pytest.mark.slow) for case in CASES])
def test_the_same_inputs_plan_byte_identically_twice_in_one_process(name, devices, options):
    assert _plan_json(name, devices, options) == _plan_json(name, devices, options)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_plans_are_byte_identical_across_processes_and_hash_seeds():
    here = [_plan_json(*case) for case in CASES]
    for seed in ("0", "4242"):
        there = _in_subprocess(seed)
        assert len(there) == len(CASES)
        for (name, devices, _), a, b in zip(CASES, here, there):
            assert a == b, f"{name} on {devices}: plan JSON differs in a process with PYTHONHASHSEED={seed}"


@pytest.mark.slow
def test_the_cli_writes_the_same_bytes_as_the_api(tmp_path):
    out = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONHASHSEED": "7"}
    result = subprocess.run([sys.executable, "-m", "fxshard.cli", "plan", "gpt2-tiny", "--devices", "4xcpu:1GB",
                             "--batch-size", "8", "--strategy", "pipeline", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    z = build("gpt2-tiny", batch_size=8)
    api = fxshard.plan(z.model, "4xcpu:1GB", z.example_inputs, strategy="pipeline", name="gpt2-tiny").to_json()
    assert out.read_text().rstrip("\n") == api
