"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

import fxshard
from fxshard.zoo import build


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: on a small shared CPU box, two spinning OpenMP
    threads competing with other processes make conv backward 20-50x slower; results do not
    change. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scratch_cost_models():
    """Cost models a test registers are unregistered when it ends, so none leaks into later tests."""
    from fxshard.cost_models import cost_models, unregister_cost_model

    before = set(cost_models())
    yield
    for name in set(cost_models()) - before:
        unregister_cost_model(name)


# gpt2-tiny planned two ways, shared by the plan-simulation and picture tests (a module-level
# fixture of the same name in a test file takes precedence).
@pytest.fixture(scope="module")
def gpt2():
    return build("gpt2-tiny", batch_size=8)


@pytest.fixture(scope="module")
def pipe(gpt2):
    """A four-stage 1F1B pipeline with four micro-batches."""
    return fxshard.plan(gpt2.model, "4xcpu:3MB", gpt2.example_inputs, strategy="pipeline", schedule="1f1b",
                        microbatches=4)


@pytest.fixture(scope="module")
def single(gpt2):
    """The same model on one device."""
    return fxshard.plan(gpt2.model, "1xcpu:64MB", gpt2.example_inputs)
