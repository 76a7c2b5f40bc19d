"""Test-suite set-up: offline by construction.

``HF_HUB_OFFLINE`` and friends are set before anything imports huggingface_hub, and outgoing
network connections to anything but loopback are refused, so a hidden download fails fast
instead of hanging on retries.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import socket  # noqa: E402

import pytest  # noqa: E402

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_LOCAL = ("127.", "localhost", "::1", "0.0.0.0")


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return True
    host = str(address[0])
    return host.startswith(_LOCAL) or host == ""


class NetworkBlockedError(RuntimeError):
    """Raised when a test tries to reach the network."""


def _guarded_connect(self, address):
    if not _is_local(address):
        raise NetworkBlockedError(f"network access blocked in tests (tried {address!r})")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_local(address):
        raise NetworkBlockedError(f"network access blocked in tests (tried {address!r})")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep torch on the two cores of the CI machine and restore global RNG afterwards."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)
