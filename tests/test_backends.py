"""Backend report, automatic choice, KDFAST_BACKEND, forced backends that cannot run."""

import pytest
import torch

import kdfast
from kdfast import dispatch, fused, reference


def test_report_lists_every_backend_with_a_reason():
    report = kdfast.backends()
    assert list(report) == ["torch", "cpu", "triton", "cuda"]
    for name in ("torch", "cpu", "triton"):  # triton: through its interpreter (conftest)
        assert report[name].available and report[name].reason == ""
    for status in report.values():
        assert status.name in str(status)
        assert ("unavailable" in str(status)) != status.available


def test_auto_picks_the_fused_cpu_kernels_and_the_reference_for_float64():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert dispatch.resolve("kd_loss", None, cpu, (dtype, dtype)) is fused.OPS["kd_loss"]
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


def test_forcing_a_backend_that_cannot_run_says_why():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(kdfast.BackendUnavailableError,
                       match="backend 'cuda' cannot run kd_loss here: (no CUDA GPU|not compiled)"):
        kdfast.kd_loss(s, t, backend="cuda")


def test_without_the_interpreter_triton_needs_a_gpu():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = "import kdfast; print(kdfast.backends()['triton'].reason)"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    if torch.cuda.is_available():
        assert out.stdout.strip() == ""
    else:
        assert "no CUDA GPU" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


def test_forcing_the_cpu_backend_on_float64_says_why():
    s, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(kdfast.BackendUnavailableError, match="reads float32, float16, bfloat16 logits, not float64"):
        kdfast.dist_loss(s, t, backend="cpu")


def test_environment_variable_selects_the_backend(monkeypatch):
    s, t, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 1, 2])
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    expected = kdfast.cmkd_loss(s, t, y)
    assert expected.grad_fn is None or "Fused" not in type(expected.grad_fn).__name__
    monkeypatch.setenv("KDFAST_BACKEND", "cuda")
    with pytest.raises(kdfast.BackendUnavailableError, match="backend 'cuda' cannot run cmkd_loss"):
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


def test_measured_choice_leads_auto_on_that_gpu(monkeypatch):
    # backend_choice.json (written from GPU benchmarks) puts the measured backend first.
    monkeypatch.setattr(dispatch, "_gpu_name", lambda index: "Test GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dispatch, "measured_choices", lambda: {"Test GPU": {"kd_loss": "cuda"}})
    gpu = torch.device("cuda", 0)
    assert dispatch.auto_preference("kd_loss", gpu) == ("cuda", "triton", "torch")
    assert dispatch.auto_preference("dist_loss", gpu) == ("triton", "cuda", "torch")  # not measured: default
    assert dispatch.auto_preference("kd_loss", torch.device("cpu")) == ("cpu", "torch")
    # Unmeasured losses with a Spearman term: CUDA first (its PAV runs in shared memory).
    assert dispatch.auto_preference("cmkd_loss", gpu) == ("cuda", "triton", "torch")
    monkeypatch.setattr(dispatch, "measured_choices", lambda: {"Test GPU": {"cmkd_loss": "triton"}})
    assert dispatch.auto_preference("cmkd_loss", gpu) == ("triton", "cuda", "torch")  # measured: overrides


def test_choice_file_is_valid():
    choices = dispatch.measured_choices()
    for device, table in choices.items():
        assert all(backend in ("triton", "cuda") for loss, backend in table.items() if loss != "measured"), device
