"""The GPU path's known defects, one test each where a CPU machine can reach it (Triton's
interpreter, pure-Python dispatch, host-side C++ through kdfast._C_cuda), and a `gpu` test
that would expose it on a GPU. The `gpu` tests here are all `smoke`: stage 1 of
benchmarks/run_gpu.sh runs them first, with a few shapes per kernel."""

import re

import pytest
import torch
from test_fused import CASES, _applicable, _inputs, _loss_and_grads, _relative_errors

import kdfast
from kdfast import dispatch, fused
from kdfast.gate import gate_compact, gate_compact_reference
from kdfast.kernels import gate as triton_gate
from kdfast.kernels import kd_losses, launch

gpu_smoke = [pytest.mark.gpu, pytest.mark.smoke]
ALL_INSTALLED = {"installed": lambda name: None, "gpu_name": "a GPU with no measured choice"}
TRITON_ONLY = {"installed": lambda name: "not built" if name == "cuda" else None,
               "gpu_name": "a GPU with no measured choice"}
CUDA = torch.device("cuda")


def _cuda_module():
    if fused._C_cuda is None:
        pytest.skip("kdfast._C_cuda is not built here (no nvcc)")
    return fused._C_cuda


# ----------------------------------------------------------- 1. the Triton PAV loop's race

@pytest.mark.interpreter
def test_triton_spearman_with_long_merges_matches_the_cpu_kernel():
    # C > 256: several warps on a GPU. A student ranking the classes almost in reverse of the
    # teacher makes pool-adjacent-violators merge long runs of blocks.
    generator = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 600, generator=generator)
    student = (-teacher + 0.05 * torch.randn(2, 600, generator=generator)).requires_grad_()
    ours = kdfast.spearman_loss(student, teacher, backend="triton")
    (ours_grad,) = torch.autograd.grad(ours, student)
    expected = kdfast.spearman_loss(student, teacher, backend="cpu")
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_pav_lanes_are_one_thread_each_so_no_slot_is_shared(tmp_path):
    """The PAV kernel needs no barrier because thread r alone reads and writes row r's
    workspace: compiled with one warp for 32 rows, its IR has a single distributed layout
    of one element per thread and lane, no layout conversion and no shared memory."""
    from helpers import compile_for_hopper

    report = compile_for_hopper([dict(
        label="pav", kernel="kd_losses._pav_kernel", constexprs={"ROWS": kd_losses.PAV_ROWS}, warps=1,
        types={"theta_ptr": "*fp64", "stack_start_ptr": "*i32", "stack_a_ptr": "*fp64", "stack_b_ptr": "*fp64",
               "block_count_ptr": "*i32"}, integers=("B", "C"), divisibility=False, ir=True)], tmp_path, timeout=300)
    ir = report["pav"]["ttgir"]
    layouts = re.findall(r"^#\w+ = #ttg\.(\w+)<(.*)>$", ir, re.M)
    assert [kind for kind, _ in layouts] == ["blocked"], layouts
    assert "sizePerThread = [1]" in layouts[0][1] and "threadsPerWarp = [32]" in layouts[0][1], layouts
    assert '"ttg.num-warps" = 1' in ir
    for forbidden in ("ttg.convert_layout", "ttg.local_alloc", "ttg.local_store", "ttg.local_load"):
        assert forbidden not in ir, forbidden


@pytest.mark.parametrize("classes", [1000, 8192])
@pytest.mark.gpu
@pytest.mark.smoke
def test_triton_spearman_is_deterministic_and_agrees_on_a_gpu(classes):
    generator = torch.Generator(device="cuda").manual_seed(classes)
    teacher = torch.randn(4096, classes, device="cuda", generator=generator)
    student = (-teacher + torch.randn(4096, classes, device="cuda", generator=generator)).requires_grad_()
    runs = []
    for _ in range(20):
        loss = kdfast.spearman_loss(student, teacher, backend="triton")
        runs.append((loss.detach(), torch.autograd.grad(loss, student)[0]))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])
    s_cpu = student.detach().cpu().requires_grad_()
    expected = kdfast.spearman_loss(s_cpu, teacher.cpu(), backend="cpu")
    (expected_grad,) = torch.autograd.grad(expected, s_cpu)
    torch.testing.assert_close(runs[0][0].cpu(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[0][1].cpu(), expected_grad, rtol=1e-4, atol=1e-9)


# ------------------------------------------- 2. the CUDA Spearman layouts and workspace

def test_spearman_plan_picks_the_smallest_block_that_holds_the_row():
    module = _cuda_module()
    assert module.SPEARMAN_BLOCK_SORT_MAX == 8192
    buckets = [128, 256, 512, 1024]
    for cols in list(range(1, 2200)) + [4095, 4096, 4097, 8191, 8192, 8193, 32000, 2**24, 2**31 - 1]:
        plan = module.plan_spearman(cols)
        assert plan.block_sort == (cols <= 8192), cols
        if not plan.block_sort:
            assert plan.threads == 256 and plan.items == 0, cols  # the segmented-sort path, kThreads
            continue
        assert plan.items == 8 and plan.threads in buckets, cols
        capacity = plan.threads * plan.items
        assert capacity >= cols, cols  # the whole row in one block's sort
        smaller = buckets.index(plan.threads) - 1
        assert smaller < 0 or buckets[smaller] * plan.items < cols, cols  # and no larger block than needed
        # The finish kernel holds the same logits per block: the sorts' shape, but 256 × 32
        # for the 1024-thread bucket (no register spill).
        assert plan.finish_threads * plan.finish_items == capacity, cols
        assert (plan.finish_threads, plan.finish_items) == ((256, 32) if plan.threads == 1024 else (plan.threads, 8))
    # A C = 1000 row takes 128 threads of 8 logits (the bucket the 4096 × 1000 target uses).
    assert (module.plan_spearman(1000).threads, module.plan_spearman(1024).threads,
            module.plan_spearman(1025).threads) == (128, 128, 256)


def test_spearman_chunks_bound_the_workspace_at_any_batch():
    module = _cuda_module()
    limit = module.SPEARMAN_CHUNK_LOGITS
    for rows in (1, 7, 4096, 10**6, 2**31 - 1):
        for cols in (1, 2, 1000, 8192, 8193, 32000, limit, limit + 1, 2**31 - 1):
            chunk = module.spearman_chunk_rows(rows, cols)
            assert 1 <= chunk <= rows, (rows, cols)
            assert chunk * cols <= max(limit, cols), (rows, cols)  # the workspace holds one chunk
            assert chunk == rows or (chunk + 1) * cols > limit, (rows, cols)  # and chunks are as long as fit
    # The CUB segmented sort counts in int: a chunk of long rows stays under 2^31 logits.
    assert module.spearman_chunk_rows(10**6, 8193) * 8193 < 2**31


@pytest.mark.parametrize("shape", [(3, 2), (3, 1000), (70, 1000), (3, 1024), (3, 1025), (3, 2048), (3, 2049),
                                   (3, 4096), (3, 4097), (3, 8192), (3, 8193), (3, 1100), (3, 2235)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.gpu
@pytest.mark.smoke
def test_cuda_spearman_at_the_layout_boundaries(shape):
    """Each block size of the in-block sorts (plan_spearman) at its first and last C, the
    segmented-sort path beyond, several PAV blocks of 32 rows (70 rows), and the widths
    whose launches once failed (C ≈ 1100, 2235: a shared-memory limit of the old kernel)."""
    s, t, y, w = _inputs(shape)
    truth = _loss_and_grads("cmkd", s.float().double(), t.float().double(), y, w, "torch", "cpu")
    got = _loss_and_grads("cmkd", s.float(), t.float(), y, w, "cuda", "cuda")
    for error in _relative_errors(got, truth):
        assert error <= 1e-5
    # bf16: the 16-bit sort keys, and many ties among both rows' values, against the CPU
    # kernels on the same rounded inputs.
    s, t = s.bfloat16(), t.bfloat16()
    cpu = _loss_and_grads("cmkd", s, t, y, w, "cpu", "cpu")
    got = _loss_and_grads("cmkd", s, t, y, w, "cuda", "cuda")
    errors = _relative_errors(got, cpu)
    assert errors[0] <= 1e-5, errors
    assert max(errors[1:]) <= torch.finfo(torch.bfloat16).eps, errors  # both gradients are rounded to bf16


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [9, 1000, 8192])
def test_cuda_spearman_orders_nan_teacher_values_as_the_cpu(cols):
    """fp32 sort keys from the bits: a negative NaN below −inf, NaNs of other payloads in tie
    groups of their own, −0 tied with +0 — the CPU kernel's order (a GPU add of 0 would
    return one canonical NaN and move all of them above +inf)."""
    s, t, _, _ = _inputs((3, cols))
    s, t = s.float(), t.float()
    bits = t.view(torch.int32)
    bits[0, 1] = -4194304  # 0xffc00000: the negative quiet NaN x86 makes of 0·inf
    bits[0, 2] = 0x7FC00001
    bits[0, 3] = 0x7FC00002
    t[1, 0], t[1, cols - 1] = -0.0, 0.0
    cpu = _grads(lambda a, b, k: kdfast.spearman_loss(a, b, backend=k), s, t, "cpu")
    got = _grads(lambda a, b, k: kdfast.spearman_loss(a, b, backend=k), s.cuda(), t.cuda(), "cuda")
    for ours, theirs in zip(got, cpu):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.smoke
def test_cuda_spearman_rows_across_chunks_match_the_rows_alone():
    """2050 rows of 8192 classes are two Spearman chunks (2048 rows each at most): the rows
    around the boundary get the gradients they get alone (the chunks' offsets)."""
    module = _cuda_module()
    rows, cols = 2050, 8192
    assert module.spearman_chunk_rows(rows, cols) == 2048
    s, t, _, _ = _inputs((rows, cols))
    s, t = s.float().cuda().requires_grad_(), t.float().cuda()
    (full,) = torch.autograd.grad(kdfast.spearman_loss(s, t, backend="cuda"), s)
    part = s.detach()[2040:].clone().requires_grad_()
    (alone,) = torch.autograd.grad(kdfast.spearman_loss(part, t[2040:], backend="cuda"), part)
    torch.testing.assert_close(full[2040:] * rows, alone * (rows - 2040), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------- 3. shape-aware dispatch

def test_auto_skips_backends_whose_shape_limits_the_inputs_pass():
    f32 = (torch.float32, torch.float32)
    for op in ("spearman_loss", "cmkd_loss"):
        # CUDA leads for the Spearman terms by design, at any B·C (it sorts chunks of rows).
        assert dispatch.choose(op, "auto", CUDA, f32, (64, 1000), **ALL_INSTALLED) == "cuda"
        assert dispatch.choose(op, "auto", CUDA, f32, (64, 8192), **ALL_INSTALLED) == "cuda"
        assert dispatch.choose(op, "auto", CUDA, f32, (2**19, 4096), **ALL_INSTALLED) == "cuda"
        assert dispatch.choose(op, "auto", CUDA, f32, (64, 32000), **ALL_INSTALLED) == "cuda"
        assert dispatch.choose(op, "auto", CUDA, f32, (2**16, 2**15), **ALL_INSTALLED) == "cuda"
        with pytest.raises(kdfast.BackendUnavailableError, match="at most 8192 classes.*not C=32000"):
            dispatch.choose(op, "triton", CUDA, f32, (64, 32000), **ALL_INSTALLED)
        # Without the CUDA backend, Triton up to its width, the reference beyond.
        assert dispatch.choose(op, "auto", CUDA, f32, (64, 1000), **TRITON_ONLY) == "triton"
        assert dispatch.choose(op, "auto", CUDA, f32, (64, 32000), **TRITON_ONLY) == "torch"
    assert dispatch.choose("kd_loss", "auto", CUDA, f32, (64, 32000), **ALL_INSTALLED) == "triton"
    assert dispatch.choose("kd_loss", "auto", CUDA, f32, (2**16, 2**15), **ALL_INSTALLED) == "triton"
    assert dispatch.choose("gate_compact", "auto", CUDA, (torch.float32,), (8, 10), **ALL_INSTALLED) == "triton"


def test_a_measured_choice_still_yields_to_the_shape_limits(monkeypatch):
    monkeypatch.setattr(dispatch, "measured_choices", lambda: {"Test GPU": {"spearman_loss": "triton"}})
    choice = dispatch.choose("spearman_loss", "auto", CUDA, (torch.bfloat16,) * 2, (8, 50000),
                             installed=lambda name: None, gpu_name="Test GPU")
    assert choice == "cuda"


def test_the_public_losses_pass_the_shape_to_dispatch():
    s = torch.randn(1, kd_losses.MAX_SPEARMAN_CLASSES + 1)
    with pytest.raises(kdfast.BackendUnavailableError, match="backend 'triton' cannot run spearman_loss here: "
                       "it computes the Spearman terms for at most 8192 classes"):
        kdfast.spearman_loss(s, s, backend="triton")


@pytest.mark.gpu
@pytest.mark.smoke
def test_spearman_terms_beyond_the_triton_width_run_on_a_gpu():
    s, t, y, _ = _inputs((2, 32000))
    for loss in (lambda a, b: kdfast.spearman_loss(a, b), lambda a, b: kdfast.cmkd_loss(a, b, y.to(a.device))):
        got = loss(s.float().cuda(), t.float().cuda())
        torch.testing.assert_close(got.cpu(), loss(s.float(), t.float()), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------- 4. Triton launches' device

def test_every_triton_launch_runs_inside_the_inputs_device_guard(monkeypatch):
    guard_devices = []
    depth = [0]

    class Recording:
        def __init__(self, tensor):
            guard_devices.append(tensor.device)

        def __enter__(self):
            depth[0] += 1

        def __exit__(self, *exc):
            depth[0] -= 1

    launched = []
    for module in (kd_losses, triton_gate):
        monkeypatch.setattr(module, "on_device_of", Recording)
        for name in dir(module):
            kernel = getattr(module, name)
            if name.startswith("_") and name.endswith("_kernel"):
                class Guarded:
                    def __init__(self, kernel, name):
                        self.kernel, self.name = kernel, name

                    def __getitem__(self, grid):
                        assert depth[0] == 1, f"{self.name} launched outside the device guard"
                        launched.append(self.name)
                        return self.kernel[grid]
                monkeypatch.setattr(module, name, Guarded(kernel, name))
    s, t, y, _ = _inputs((3, 7))
    s, t = s.float(), t.float()
    kdfast.cmkd_loss(s, t, y, backend="triton")
    kdfast.dist_loss(s, t, backend="triton")
    gate_compact(s, torch.arange(3), 0.5, backend="triton")
    assert set(launched) == {"_fused_row_kernel", "_spearman_prepare_kernel", "_pav_kernel",
                             "_spearman_finish_kernel", "_column_partials_kernel", "_gate_confidence_kernel",
                             "_gate_compact_kernel"}
    assert guard_devices == [s.device] * 3


@pytest.mark.gpu
@pytest.mark.smoke
def test_triton_runs_on_the_tensors_gpu_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    s, t, y, _ = _inputs((5, 300))
    torch.cuda.set_device(0)
    for name in ("kd", "dist", "cmkd", "drkd", "spearman"):
        expected = _loss_and_grads(name, s.float(), t.float(), y, torch.zeros(5), "triton", "cuda:0")
        got = _loss_and_grads(name, s.float(), t.float(), y, torch.zeros(5), "triton", "cuda:1")
        for a, b in zip(got, expected):
            assert torch.equal(a, b), name
    logits = torch.randn(9, 300, device="cuda:1")
    got = gate_compact(logits, torch.arange(9, device="cuda:1"), 0.5, backend="triton")
    expected = gate_compact_reference(logits, torch.arange(9, device="cuda:1"), 0.5)
    assert torch.equal(got[0], expected[0])
    # The CUDA backend selects the tensors' device in its own (static) runtime: PyTorch's
    # current device must be what it was.
    for name in ("kd", "cmkd"):
        expected = _loss_and_grads(name, s.float(), t.float(), y, torch.zeros(5), "cuda", "cuda:0")
        got = _loss_and_grads(name, s.float(), t.float(), y, torch.zeros(5), "cuda", "cuda:1")
        assert torch.cuda.current_device() == 0
        for a, b in zip(got, expected):
            assert torch.equal(a, b), name


# ----------------------------------------------------- 5. 64-bit offsets in the Triton gate

@pytest.mark.interpreter
def test_gate_reads_rows_past_two_to_the_31_elements():
    # Rows 2**30 elements apart: row 2 starts at element 2**31, where int32 offsets wrap.
    stride, classes = 2**30, 8
    storage = torch.empty(2 * stride + classes, dtype=torch.float16)  # 4 GiB, only three rows touched
    logits = storage.as_strided((3, classes), (stride, 1))
    logits.copy_(torch.tensor([[4.0, 0, 0, 0, 0, 0, 0, 0], [0.0] * 8, [0.0, 0, 9.0, 0, 0, 0, 0, 0]]))
    rows = torch.tensor([5, 6, 7])
    got = gate_compact(logits, rows, 0.5, backend="triton")
    expected = gate_compact_reference(logits, rows, 0.5)
    assert torch.equal(got[0], expected[0]) and int(got[1]) == 1
    torch.testing.assert_close(got[2], expected[2], rtol=1e-13, atol=0)


@pytest.mark.gpu
@pytest.mark.smoke
def test_gate_on_more_than_two_to_the_31_logits():
    active, classes = 16384, 131072
    logits = torch.zeros(active, classes, dtype=torch.bfloat16, device="cuda")
    logits[::2, 0] = 30.0  # even rows are confident and stop
    rows = torch.arange(active, device="cuda")
    next_rows, count, confidence = gate_compact(logits, rows, 0.5, backend="triton")
    assert int(count) == active // 2
    assert torch.equal(next_rows[: active // 2], rows[1::2])
    torch.testing.assert_close(confidence, gate_compact_reference(logits, rows, 0.5)[2], rtol=1e-12, atol=0)


# ----------------------------------------- 6. NaN/±inf never reach outside their row

NAN_CASES = ("kd", "pearson_rows", "spearman", "cmkd", "drkd")


def _with_guards(monkeypatch, guards):
    """torch.empty_like returns views into buffers with guard regions on both sides."""
    real = torch.empty_like

    def guarded(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        if out.numel() == 0 or out.dim() != 2:
            return out
        buffer = torch.full((out.numel() + 64,), 1234.5, dtype=out.dtype, device=out.device)
        guards.append(buffer)
        return buffer[32:32 + out.numel()].view(out.shape)

    monkeypatch.setattr(torch, "empty_like", guarded)


def _nan_rows_check(device, rows, classes, bad_rows, monkeypatch):
    s, t, y, w = _inputs((rows, classes))
    s, t = s.float(), t.float()
    s_bad, t_bad = s.clone(), t.clone()
    for row in bad_rows:
        s_bad[row, 1::7] = float("nan")
        s_bad[row, 3::11] = float("inf")
        t_bad[row, ::5] = float("nan")
        t_bad[row, 2::13] = -float("inf")
        t_bad[row, 4::17] = float("inf")
    good = [r for r in range(rows) if r not in bad_rows]
    for case in NAN_CASES:
        clean = _loss_and_grads(case, s, t, y, w, "triton", device)
        guards = []
        _with_guards(monkeypatch, guards)
        try:
            dirty = _loss_and_grads(case, s_bad, t_bad, y, w, "triton", device)
        finally:
            monkeypatch.undo()
        for buffer in guards:
            assert (buffer[:32] == 1234.5).all() and (buffer[-32:] == 1234.5).all(), case
        for a, b in zip(clean[1:], dirty[1:]):
            assert torch.equal(a[good], b[good]), case


@pytest.mark.interpreter
def test_nan_and_inf_rows_leave_the_other_rows_untouched(monkeypatch):
    _nan_rows_check("cpu", 3, 1000, [1], monkeypatch)


@pytest.mark.gpu
@pytest.mark.smoke
def test_nan_and_inf_rows_leave_the_other_rows_untouched_on_a_gpu(monkeypatch):
    _nan_rows_check("cuda", 64, 1000, [1, 63], monkeypatch)
    _nan_rows_check("cuda", 8, 5000, [7], monkeypatch)


# ----------------------------------------------------------------- 7. host synchronizations

def test_target_range_check_raises_on_the_cpu_and_asserts_on_the_device(monkeypatch):
    s = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 4\], got values in \[0, 5\]"):
        kdfast.cmkd_loss(s, s, torch.tensor([0, 5, 1]))
    # On a GPU the same check becomes one device-side assertion and no read-back.
    asserted = []
    monkeypatch.setattr(torch, "_assert_async", lambda condition, message: asserted.append((condition, message)))
    target = torch.tensor([0, 5, 1])
    monkeypatch.setattr(type(target), "device", property(lambda self: torch.device("cuda", 0)))
    from kdfast import _checks

    _checks.check_targets(target, 3, 5, torch.device("cuda", 0))
    assert len(asserted) == 1 and not bool(asserted[0][0]) and "[0, 4]" in asserted[0][1]


@pytest.mark.gpu
@pytest.mark.smoke
def test_losses_and_gate_do_not_synchronize():
    s, t, y, w = _inputs((64, 1000))
    s, t, y, w = s.float().cuda().requires_grad_(), t.float().cuda(), y.cuda(), w.float().cuda()
    calls = [lambda b: kdfast.cmkd_loss(s, t, y, backend=b), lambda b: kdfast.drkd_loss(s, t, y, backend=b),
             lambda b: kdfast.dist_loss(s, t, backend=b), lambda b: kdfast.spearman_loss(s, t, backend=b),
             lambda b: kdfast.kd_loss(s, t, backend=b)]
    for backend in ("triton", "cuda"):
        for call in calls:
            call(backend).backward()  # warm-up: compilation, allocations
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for call in calls:
                call(backend).backward()
            gate_compact(s.detach(), torch.arange(64, device="cuda"), 0.5, backend="triton")
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------- 8. the driver

def test_an_old_driver_is_named_with_a_way_out():
    message = fused.driver_problem(13000, 12080)
    assert "CUDA 13.0" in message and ">= 580.65.06" in message and "CUDA 12.8" in message
    assert "KDFAST_BACKEND=triton" in message
    assert "no NVIDIA driver" in fused.driver_problem(13000, 0)
    assert fused.driver_problem(13000, 13000) is None and fused.driver_problem(13000, 13020) is None
    assert fused.driver_problem(12040, 13000) is None


@pytest.mark.gpu
@pytest.mark.smoke
def test_the_cuda_backend_runs_on_this_driver():
    module = _cuda_module()
    runtime, driver = module.cuda_runtime_version(), module.cuda_driver_version()
    assert driver > 0
    problem = fused.driver_problem(runtime, driver)
    assert (problem is None) == kdfast.backends()["cuda"].available, problem


def test_the_cuda_backend_reports_the_driver_problem(monkeypatch):
    module = _cuda_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(module, "cuda_driver_version", lambda: 12040)
    fused._driver_problem_here.cache_clear()
    try:
        assert module.cuda_runtime_version() >= 12000
        reason = kdfast.backends()["cuda"].reason
        assert re.search(r"needs an NVIDIA driver >= [0-9.]+; this machine has a driver that supports CUDA 12\.4",
                         reason)
    finally:
        fused._driver_problem_here.cache_clear()


# ----------------------------------------------------- every kernel at a few shapes, first

@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 7), (16, 1000), (5, 1001)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.gpu
@pytest.mark.smoke
def test_every_loss_agrees_at_a_few_shapes(backend, dtype, shape):
    for case in CASES:
        if not _applicable(case, shape):
            continue
        s, t, y, w = _inputs(shape)
        s, t = s.to(dtype), t.to(dtype)
        truth = _loss_and_grads(case, s.double(), t.double(), y, w, "torch", "cpu")
        got = _loss_and_grads(case, s, t, y, w, backend, "cuda")
        if dtype == torch.float32:
            bounds = [1e-5] * 3
        else:
            reference = _loss_and_grads(case, s, t, y, w, "torch", "cuda")
            bounds = [2 * e + torch.finfo(dtype).eps / 4 for e in _relative_errors(reference, truth)]
        for name, error, bound in zip(("loss", "grad_student", "grad_teacher"), _relative_errors(got, truth), bounds):
            assert error <= bound, f"{case} {name}: {error:.2e} > {bound:.2e}"


# The CUDA row kernel's layouts: 8, 16 or 32 lanes of a warp per row up to 256 classes,
# a warp with two runs per lane up to 512, a block per row with the row in registers up
# to 2048, chunked beyond; B = 37 is a multiple of no layout's rows per block (32, 16, 8),
# so the last block holds rows past the end. C % 8 != 0 takes the scalar loads.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("classes", [1, 2, 31, 64, 65, 128, 129, 256, 257, 512, 513, 2048, 2049, 8193])
@pytest.mark.gpu
def test_cuda_row_kernel_layouts_agree(dtype, classes):
    shape = (37, classes)
    for case in CASES:
        if not _applicable(case, shape):
            continue
        s, t, y, w = _inputs(shape)
        s, t = s.to(dtype), t.to(dtype)
        truth = _loss_and_grads(case, s.double(), t.double(), y, w, "torch", "cpu")
        got = _loss_and_grads(case, s, t, y, w, "cuda", "cuda")
        if dtype == torch.float32:
            bounds = [1e-5] * 3
        else:
            reference = _loss_and_grads(case, s, t, y, w, "torch", "cuda")
            bounds = [2 * e + torch.finfo(dtype).eps / 4 for e in _relative_errors(reference, truth)]
        for name, error, bound in zip(("loss", "grad_student", "grad_teacher"), _relative_errors(got, truth), bounds):
            assert error <= bound, f"{case} C={classes} {name}: {error:.2e} > {bound:.2e}"


@pytest.mark.parametrize("classes", [1000, 64])
@pytest.mark.gpu
def test_cuda_row_kernel_unaligned_rows_take_scalar_loads(classes):
    """C % 8 == 0 but the logits start one element past a 16-byte boundary: vector loads
    would fault or read the wrong classes; the kernel must see it and load scalars."""
    s, t, y, _ = _inputs((9, classes))
    s, t = s.float(), t.float()
    for name, loss in (("kd", lambda a, b: kdfast.kd_loss(a, b, 3.0, backend="cuda")),
                       ("drkd", lambda a, b: kdfast.drkd_loss(a, b, y.cuda(), 3.0, backend="cuda"))):
        storage_s = torch.empty(s.numel() + 1, device="cuda")
        storage_t = torch.empty(t.numel() + 1, device="cuda")
        unaligned_s = storage_s[1:].view_as(s).copy_(s).requires_grad_()
        unaligned_t = storage_t[1:].view_as(t).copy_(t).requires_grad_()
        assert unaligned_s.data_ptr() % 16 != 0
        got = loss(unaligned_s, unaligned_t)
        got_grads = torch.autograd.grad(got, (unaligned_s, unaligned_t))
        a, b = s.cuda().requires_grad_(), t.cuda().requires_grad_()
        expected = loss(a, b)
        expected_grads = torch.autograd.grad(expected, (a, b))
        assert torch.equal(got, expected), name
        for g, e in zip(got_grads, expected_grads):
            assert torch.equal(g, e), name


# --------------------------------------------- further defects found by reading the code

@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_difficulty_with_a_zero_coefficient_switches_nothing_on(backend, bad):
    # The kernels switched a term on by the value of its weight, coefficient × d: with
    # corr_weight = 0 and d = NaN that is NaN != 0, and the C++ kernels then ran the Spearman
    # term on buffers never prepared for it (a crash on the CPU, a null read on CUDA).
    s, t, y, _ = _inputs((4, 10))
    weights = torch.tensor([0.3, bad, 0.5, bad], dtype=torch.float64)
    got = kdfast.cmkd_loss(s.float(), t.float(), y, corr_weight=0.0, weighting=weights, backend=backend)
    expected = kdfast.cmkd_loss(s.float(), t.float(), y, corr_weight=0.0, backend="torch")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("block", [None, 4], ids=["whole-row", "chunked"])
def test_masked_classes_at_minus_infinity_stay_finite(backend, block):
    # −inf logits (masked classes): a loss without a KL term must not be poisoned by one, a
    # chunk of only −inf must not make the online softmax NaN, and q = 0 columns have a zero
    # teacher gradient.
    import contextlib

    s, t, _, _ = _inputs((3, 8))
    s, t = s.float(), t.float()
    s[0, :4] = -float("inf")
    t[1, :4] = -float("inf")
    context = kd_losses.forced_block_size(block) if block and backend == "triton" else contextlib.nullcontext()
    with context:
        for loss in (lambda a, b, k: kdfast.pearson_loss(a, b, backend=k),
                     lambda a, b, k: kdfast.dist_loss(a, b, 1.0, 1.0, 0.0, backend=k)):
            got = _grads(loss, s, t, backend)
            expected = _grads(loss, s, t, "torch")
            for a, b in zip(got, expected):
                assert torch.isfinite(a).all()
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        grad_teacher = _grads(lambda a, b, k: kdfast.kd_loss(a, b, backend=k), s, t, backend)[2]
        assert torch.isfinite(grad_teacher[1]).all() and (grad_teacher[1, :4] == 0).all()


def _grads(loss, s, t, backend):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    value = loss(s, t, backend)
    return [value.detach(), *torch.autograd.grad(value, (s, t))]


@pytest.mark.interpreter
def test_the_triton_operator_checks_its_arguments_like_the_cpu_one():
    op = torch.ops.kdfast.fused_kd_loss_triton
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    defaults = dict(temperature=1.0, kl_coef=1.0, ce_coef=0.0, pearson_coef=0.0, spearman_coef=0.0, column_coef=0.0,
                    rank_strength=1.0, difficulty_mode=0, difficulty_value=0.0, rectify=False, student_grad=True,
                    teacher_grad=False)

    def call(target=None, difficulty=None, **changes):
        arguments = {**defaults, **changes}
        return op(s, t, target, difficulty, *arguments.values())

    with pytest.raises(ValueError, match="target must have shape \\(3,\\)"):
        call(target=torch.tensor([0, 1]), ce_coef=1.0)
    with pytest.raises(ValueError, match="difficulty_mode=2\\) needs the difficulty tensor"):
        call(difficulty_mode=2, pearson_coef=1.0)
    with pytest.raises(ValueError, match="rectification does not combine with the column term"):
        call(target=torch.tensor([0, 1, 2]), rectify=True, column_coef=1.0)
    with pytest.raises(ValueError, match=r"temperature must be in \(0, 100\] and rank_strength > 0"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="at least one row"):
        op(s[:0], t[:0], None, None, *defaults.values())
    # A target of 2^32 + 3 is out of range (not class 3 after a 32-bit truncation): its row is NaN.
    loss, grad, _ = call(target=torch.tensor([0, 2**32 + 3, 1]), ce_coef=1.0)
    assert torch.isnan(loss) and torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()


# ----------------------------------------- the hardening issue's loss cases (issue 12)

@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int64])
@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_targets_of_every_integer_dtype(dtype, backend):
    s, t, y, _ = _inputs((4, 10))
    for loss in (lambda a, b, k, target: kdfast.cmkd_loss(a, b, target, backend=k),
                 lambda a, b, k, target: kdfast.drkd_loss(a, b, target, ce_weight=0.5, backend=k)):
        expected = loss(s.float(), t.float(), "torch", y)
        torch.testing.assert_close(loss(s.float(), t.float(), backend, y.to(dtype)), expected, rtol=1e-5, atol=1e-6)
    # fp64 logits go to the reference under auto.
    kdfast.cmkd_loss(s, t, y.int())
    adapter = kdfast.nn.TeacherAdapter(4, 10)
    adapter.adapter_loss(adapter(t.float(), torch.randn(4, 4)), s.float(), y.int())


def test_check_finite_covers_the_weighting_tensor():
    s, t, y, _ = _inputs((4, 10))
    weights = torch.tensor([0.1, float("nan"), 0.3, 0.4])
    with pytest.raises(ValueError, match="weighting contains NaN or Inf"):
        kdfast.cmkd_loss(s.float(), t.float(), y, weighting=weights, check_finite=True)


def test_reference_standardization_of_huge_logits():
    # Squaring logits of 1e20 overflowed float32: the reference's Spearman term gave 1.0
    # where the fused kernels and float64 give 1.522.
    generator = torch.Generator().manual_seed(5)
    s = torch.randn(3, 50, generator=generator, dtype=torch.float64)
    t = torch.randn(3, 50, generator=generator, dtype=torch.float64)
    s[:, 7] = 1e20
    exact = kdfast.spearman_loss(s, t, backend="torch")
    for backend in ("torch", "cpu"):
        torch.testing.assert_close(kdfast.spearman_loss(s.float(), t.float(), backend=backend).double(), exact,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.interpreter),
                                     pytest.param("triton-chunked", marks=pytest.mark.interpreter)])
def test_masked_teacher_classes_have_probability_zero_on_every_backend(backend):
    # A −inf teacher logit is a class the teacher rules out: its KL term is 0. KD, DR-KD and
    # CMKD (entropy weighting included) are finite and agree across backends; "triton-chunked"
    # runs Triton's chunked layout (KL and entropy online, in the first pass), with a chunk
    # of only −inf teacher logits.
    import contextlib

    chunked = backend == "triton-chunked"
    backend = "triton" if chunked else backend
    with kd_losses.forced_block_size(4) if chunked else contextlib.nullcontext():
        _masked_teacher_case(backend)


def _masked_teacher_case(backend):
    s, t, y, _ = _inputs((4, 12))
    s, t = s.float(), t.float()
    t[:, 4:8] = -float("inf")
    t[1, :4] = -float("inf")  # row 1: only −inf until column 8
    y = torch.tensor([0, 1, 2, 3])
    exact = {name: _grads(loss, s.double(), t.double(), "torch") for name, loss in MASKED_LOSSES.items()}
    for name, loss in MASKED_LOSSES.items():
        got = _grads(loss, s, t, backend)
        for a, b in zip(got[:2], exact[name][:2]):
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    # A −inf student logit where the teacher's probability is positive: an infinite loss.
    s[0, 0] = -float("inf")
    assert kdfast.kd_loss(s, t, backend=backend) == float("inf")


MASKED_LOSSES = {
    "kd": lambda a, b, k: kdfast.kd_loss(a, b, 2.0, backend=k),
    "drkd": lambda a, b, k: kdfast.drkd_loss(a, b, torch.tensor([0, 1, 2, 3]), 2.0, backend=k),
    "cmkd": lambda a, b, k: kdfast.cmkd_loss(a, b, None, 2.0, backend=k),
}


@pytest.mark.parametrize("rows", [65, 150, 200])
def test_a_constant_teacher_column_has_no_intra_class_gradient(rows):
    # Identical teacher rows (with ties) make every teacher column constant: ρ of each column
    # is 0 and its gradient exactly 0. The CPU column statistics computed the row's
    # probabilities differently from the row kernel, so (q − mean_q) was rounding, times
    # the 1/1e-8 floor of the correlation: ‖g‖₁ = 3.36 at B = 65.
    # The Triton row kernel took p and q from its own normalizers (‖g‖₁ = 4.7 at B = 65)
    # until it used the column statistics' own (both layouts checked); so did the CUDA row
    # kernel (found by reading; run where a GPU is, at C = 10 and chunked at C = 2100).
    import contextlib

    generator = torch.Generator().manual_seed(rows)
    s = torch.randn(rows, 10, generator=generator) * 3
    t = (torch.randn(1, 10, generator=generator) * 3).round().repeat(rows, 1)
    runs = [("cpu", None, s, t), ("torch", None, s, t), ("triton", None, s, t), ("triton", 4, s, t)]
    if torch.cuda.is_available() and fused.cuda_unavailable() is None:
        wide_s = torch.randn(rows, 2100, generator=generator) * 3
        wide_t = (torch.randn(1, 2100, generator=generator) * 3).round().repeat(rows, 1)
        runs += [("cuda", None, s.cuda(), t.cuda()), ("cuda", None, wide_s.cuda(), wide_t.cuda())]
    for backend, block, logits, teacher in runs:
        if backend == "triton" and not fused.triton_interpreted():
            continue
        student = logits.clone().requires_grad_()
        with kd_losses.forced_block_size(block) if block else contextlib.nullcontext():
            loss = kdfast.dist_loss(student, teacher, 1.0, 0.0, 1.0, backend=backend)
            (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == 1.0 and torch.equal(grad, torch.zeros_like(grad)), (backend, block, logits.shape)
