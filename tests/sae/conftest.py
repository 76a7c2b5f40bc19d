"""Fixtures for the sae tests: tiny synthetic dictionary data and fitted tiny models."""
from __future__ import annotations

import pytest
import torch
from sae_testing import TINY, make_tiny

from sae.synthetic import sparse_dictionary_data


@pytest.fixture(scope="session")
def tiny_data():
    """256 x 16 samples from 24 atoms, 2 active each."""
    return sparse_dictionary_data(n=256, d=16, n_atoms=24, k=2, seed=3)


@pytest.fixture(scope="session")
def small_data():
    """2,560 x 32 samples from 48 unit atoms, 3 active each (recovery tests)."""
    return sparse_dictionary_data(n=2560, d=32, n_atoms=48, k=3, seed=0)


@pytest.fixture(scope="session")
def fitted_tiny(tiny_data):
    """One fitted tiny model per variant (shared by read-only tests)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before the per-test thread fixture
    try:
        return {name: make_tiny(name).fit(tiny_data.X) for name in TINY}
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from a second thread; on a shared machine it only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
