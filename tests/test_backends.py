"""Backend report, KDFAST_BACKEND, forced backends that cannot run."""

import pytest
import torch

import kdfast
from kdfast import dispatch


def test_report_lists_every_backend_with_a_reason():
    report = kdfast.backends()
    assert list(report) == ["torch", "cpu", "triton", "cuda"]
    assert report["torch"].available and report["torch"].reason == ""
    for name in ("cpu", "triton", "cuda"):
        assert not report[name].available
        assert "not built yet" in report[name].reason
        assert name in str(report[name]) and "unavailable" in str(report[name])


def test_auto_runs_the_reference_on_cpu_tensors():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(kdfast.kd_loss(s, t, backend="auto"), kdfast.kd_loss(s, t, backend="torch"))
    assert dispatch.resolve("kd_loss", None, torch.device("cpu")) is kdfast.reference.kd_loss


@pytest.mark.parametrize("name", ["cpu", "triton", "cuda"])
def test_forcing_an_unbuilt_backend_says_why(name):
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(kdfast.BackendUnavailableError, match=f"backend '{name}' cannot run kd_loss here: not built yet"):
        kdfast.kd_loss(s, t, backend=name)


def test_environment_variable_selects_the_backend(monkeypatch):
    s, t, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 1, 2])
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    assert torch.isfinite(kdfast.cmkd_loss(s, t, y))
    monkeypatch.setenv("KDFAST_BACKEND", "cpu")
    with pytest.raises(kdfast.BackendUnavailableError, match="backend 'cpu' cannot run cmkd_loss"):
        kdfast.cmkd_loss(s, t, y)
    # An explicit argument wins over the environment.
    assert torch.isfinite(kdfast.cmkd_loss(s, t, y, backend="torch"))
    monkeypatch.setenv("KDFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="the environment variable KDFAST_BACKEND must be one of"):
        kdfast.kd_loss(s, t)


def test_unknown_backend_argument():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'cpu', 'triton', 'cuda'\), got 'gpu'"):
        kdfast.kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="gpu")


def test_device_support_is_part_of_the_reasons():
    # A built backend that runs on other devices is refused with the device as reason.
    gpu_only = dispatch.Backend("demo", "test double", lambda: None, {"kd_loss": None}, ("cuda",))
    assert gpu_only.not_supported_reasons("kd_loss", torch.device("cpu")) == [
        "it runs on cuda tensors, not cpu"
    ]
    assert gpu_only.not_supported_reasons("dist_loss", torch.device("cuda")) == [
        "it has no implementation of dist_loss"
    ]
