"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


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
