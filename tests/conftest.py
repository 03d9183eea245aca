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


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch):
    """Every test starts from the same seed and from the automatic backend choice."""
    monkeypatch.delenv("KDFAST_BACKEND", raising=False)
    torch.manual_seed(0)
