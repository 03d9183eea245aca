"""Test configuration: CPU-only collection, Triton's interpreter, a clean backend choice."""

import os

# Triton must see this before it is first imported, so that its kernels run on the CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped cleanly on CPU-only machines")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Every (backend, device) pair whose implementations the tests compare; GPU pairs carry
# the gpu marker. Tests create inputs on the CPU and move them to the device.
BACKEND_DEVICES = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
]
FUSED_BACKEND_DEVICES = [p for p in BACKEND_DEVICES if p.values[0][0] != "torch"]


@pytest.fixture(params=BACKEND_DEVICES)
def backend_device(request):
    """(backend name, device) for tests that every implementation must pass."""
    return request.param


@pytest.fixture(params=FUSED_BACKEND_DEVICES)
def fused_backend_device(request):
    """(backend name, device) of the fused kernels, compared against the reference."""
    return request.param


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch):
    """Every test starts from the same seed and from the automatic backend choice."""
    monkeypatch.delenv("KDFAST_BACKEND", raising=False)
    torch.manual_seed(0)
