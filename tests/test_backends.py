"""Backend report, automatic choice, KDFAST_BACKEND, forced backends that cannot run."""

import pytest
import torch

import kdfast
from kdfast import dispatch, fused, reference


def test_report_lists_every_backend_with_a_reason():
    report = kdfast.backends()
    assert list(report) == ["torch", "cpu", "triton", "cuda"]
    for name in ("torch", "cpu"):
        assert report[name].available and report[name].reason == ""
    assert not report["triton"].available and "not built yet" in report["triton"].reason
    for status in report.values():
        assert status.name in str(status)
        assert ("unavailable" in str(status)) != status.available


def test_auto_picks_the_fused_cpu_kernels_and_the_reference_for_float64():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert dispatch.resolve("kd_loss", None, cpu, (dtype, dtype)) is fused.kd_loss
    assert dispatch.resolve("kd_loss", None, cpu, (torch.float64, torch.float64)) is reference.kd_loss
    assert dispatch.resolve("kd_loss", None, cpu, (torch.float32, torch.float64)) is reference.kd_loss
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(kdfast.kd_loss(s, t, backend="auto"), kdfast.kd_loss(s, t, backend="torch"))


def test_cuda_kernels_are_compiled_wherever_nvcc_is():
    # DESIGN "Builds": nvcc compiles the CUDA sources even next to a CPU-only PyTorch, so a
    # CUDA compile error fails the build (and this test) on a machine without a GPU too.
    import os
    import shutil

    if os.environ.get("KDFAST_CUDA") == "0" or shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH (or KDFAST_CUDA=0): the CUDA kernels are not built here")
    assert fused.CUDA_BUILD_ERROR is None
    assert hasattr(fused._C_cuda, "fused_loss")


@pytest.mark.parametrize("name,reason", [("triton", "not built yet"), ("cuda", "(no CUDA GPU|not compiled)")])
def test_forcing_a_backend_that_cannot_run_says_why(name, reason):
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(kdfast.BackendUnavailableError, match=f"backend '{name}' cannot run kd_loss here: {reason}"):
        kdfast.kd_loss(s, t, backend=name)


def test_forcing_the_cpu_backend_on_float64_says_why():
    s, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(kdfast.BackendUnavailableError, match="reads float32, float16, bfloat16 logits, not float64"):
        kdfast.dist_loss(s, t, backend="cpu")


def test_environment_variable_selects_the_backend(monkeypatch):
    s, t, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 1, 2])
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    expected = kdfast.cmkd_loss(s, t, y)
    assert expected.grad_fn is None or "Fused" not in type(expected.grad_fn).__name__
    monkeypatch.setenv("KDFAST_BACKEND", "triton")
    with pytest.raises(kdfast.BackendUnavailableError, match="backend 'triton' cannot run cmkd_loss"):
        kdfast.cmkd_loss(s, t, y)
    # An explicit argument wins over the environment.
    torch.testing.assert_close(kdfast.cmkd_loss(s, t, y, backend="cpu"), expected)
    monkeypatch.setenv("KDFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="the environment variable KDFAST_BACKEND must be one of"):
        kdfast.kd_loss(s, t)


def test_unknown_backend_argument():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'cpu', 'triton', 'cuda'\), got 'gpu'"):
        kdfast.kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="gpu")


def test_device_support_is_part_of_the_reasons():
    gpu_only = dispatch.Backend("demo", "test double", lambda: None, {"kd_loss": None}, ("cuda",))
    assert gpu_only.not_supported_reasons("kd_loss", torch.device("cpu")) == ["it runs on cuda tensors, not cpu"]
    assert gpu_only.not_supported_reasons("dist_loss", torch.device("cuda")) == ["it has no implementation of dist_loss"]
    report = dispatch._REGISTRY["cpu"].not_supported_reasons("kd_loss", torch.device("cuda"), (torch.float32,))
    assert report == ["it runs on cpu tensors, not cuda"]


def test_no_backend_fits_lists_every_reason(monkeypatch):
    # With the reference made unavailable, auto has nothing left for float64 and says why for each.
    monkeypatch.setitem(dispatch._REGISTRY, "torch", dispatch.Backend(
        "torch", "disabled for this test", lambda: "disabled for this test", {}, None))
    with pytest.raises(kdfast.BackendUnavailableError, match="no backend can run kd_loss on cpu tensors: "
                       "cpu: it reads .* not float64 .* torch: disabled for this test"):
        kdfast.kd_loss(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
