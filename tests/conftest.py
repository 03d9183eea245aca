"""Test configuration: CPU-only collection, Triton's interpreter, a clean backend choice."""

import os

import pytest
import torch

# Without a GPU, Triton's kernels run through its interpreter on CPU tensors. Triton reads
# the variable when it is first imported (importing torch does not import it).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped cleanly on CPU-only machines")
    config.addinivalue_line("markers", "interpreter: runs Triton through its CPU interpreter (no GPU)")
    config.addinivalue_line("markers", "smoke: a GPU test of stage 1 of benchmarks/run_gpu.sh (few shapes per kernel, "
                            "every known GPU defect); the other gpu tests run in stage 2")


def pytest_collection_modifyitems(config, items):
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "interpreter" in item.keywords and not interpreted:
            item.add_marker(pytest.mark.skip(reason="Triton runs compiled here, not interpreted"))


# Every (backend, device) pair whose implementations the tests compare; GPU pairs carry
# the gpu marker. Tests create inputs on the CPU and move them to the device.
# ("triton", "cpu") runs the Triton kernels through Triton's interpreter (CPU-only machines).
BACKEND_DEVICES = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpreter", marks=pytest.mark.interpreter),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton", marks=pytest.mark.gpu),
]
# The agreement tests' full shapes; the interpreter gets its own, smaller ones (test_triton.py).
FUSED_BACKEND_DEVICES = [p for p in BACKEND_DEVICES if p.values[0][0] != "torch" and p.id != "triton-interpreter"]


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
