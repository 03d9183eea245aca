"""Input generators and independent formulations shared by the tests."""

import numpy as np
import torch


def logits(batch, classes, dtype=torch.float64, scale=3.0, generator=None):
    return (torch.randn(batch, classes, dtype=torch.float64, generator=generator) * scale).to(dtype)


def teacher_like(batch, classes, generator=None):
    """Logits shaped like a trained classifier's: Gaussian background, one confident class.

    Returns (student, teacher, target) in float64; the student is a noisy copy of the
    teacher, so the two agree on most of their ranking.
    """
    teacher = torch.randn(batch, classes, dtype=torch.float64, generator=generator) * 2.0
    target = torch.randint(0, classes, (batch,), generator=generator)
    teacher[torch.arange(batch), target] += 10.0
    noise = torch.randn(batch, classes, dtype=torch.float64, generator=generator)
    student = teacher + 0.7 * teacher.std(dim=1, keepdim=True, correction=0) * noise
    return student, teacher, target


def dist_paper(z_s, z_t, beta=1.0, gamma=1.0, tau=1.0, eps=1e-8):
    """DIST, transcribed from the authors' published code (Huang et al., NeurIPS 2022).

    The code adds ``eps`` to the norm product where kdfast takes ``max(product, 1e-8)``.
    """

    def cosine_similarity(a, b):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a, b):
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    def intra_class_relation(y_s, y_t):
        return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))

    y_s = (z_s / tau).softmax(dim=1)
    y_t = (z_t / tau).softmax(dim=1)
    inter_loss = tau**2 * inter_class_relation(y_s, y_t)
    intra_loss = tau**2 * intra_class_relation(y_s, y_t)
    return beta * inter_loss + gamma * intra_loss


def rectify_loop(teacher, target):
    """DR-KD rectification, one row at a time in NumPy."""
    out = teacher.detach().cpu().numpy().copy()
    for i, y in enumerate(target.tolist()):
        j = int(np.argmax(out[i]))
        if j != y:
            out[i, j], out[i, y] = out[i, y], out[i, j]
    return torch.from_numpy(out)


def random_teacher_file(folder, arch: str, channels: int, size: int):
    """A saved randomly initialized zoo model with non-trivial BatchNorm statistics and scales
    (so that every layer matters in eval mode): the teachers of the cache and replay tests."""
    from kdfast.checkpoint import save_state_dict
    from kdfast.models import create_model

    torch.manual_seed(1)
    model = create_model(arch, 10, channels, size)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    path = folder / f"{arch}-{channels}-{size}.pt"
    save_state_dict(path, model.state_dict())
    return path


def small_digits_folder(root, size: int = 16, per_class: int = 12):
    """The digits as a ``size`` px JPEG folder under ``root`` with ``per_class`` training images per class."""
    from kdfast.data import write_digits_folder

    write_digits_folder(root, size=size)
    for class_folder in (root / "train").iterdir():
        for extra in sorted(class_folder.iterdir())[per_class:]:
            extra.unlink()
    return root


#: The Triton row kernel's constexprs for kd_loss at C = 1000, bf16 (resident, 2 rows per
#: program, 8 warps): the base the Hopper compilation tests vary.
KD_ROW_KERNEL = dict(C=1000, HAS_TARGET=False, HAS_KL=True, HAS_CE=False, HAS_PEARSON=False, HAS_SPEARMAN=False,
                     HAS_COLUMN=False, RECTIFY=False, DIFFICULTY_MODE=0, STUDENT_GRAD=True, TEACHER_GRAD=False,
                     ROWS=2, BLOCK=1024, RESIDENT=True)
#: The integer (i32) scalar arguments of the kd_losses kernels.
KERNEL_INTEGERS = ("C", "B", "K", "log_k", "rows_per_chunk", "rows_per_program")


def compile_for_hopper(kernels: list[dict], cache_dir, timeout: float = 900) -> dict:
    """Compile Triton kernels for sm_90 in a process without the interpreter and return
    tests/hopper_compile.py's report (per label: registers, spills, cubin bytes, IR); see
    that script for the spec of ``kernels``. ``cache_dir``: a fresh Triton cache (a cache
    hit would skip ptxas and its log)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    script = Path(__file__).with_name("hopper_compile.py")
    result = subprocess.run([sys.executable, str(script)], input=json.dumps(kernels), env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def install_fake_cuda_launcher(monkeypatch, launcher):
    """Stand ``launcher`` in for the compiled CUDA module and make the wrapper's CUDA device and
    stream calls no-ops, so that the CUDA wrapper (``kdfast.fused._fused_kd_loss_cuda``) runs on
    CPU tensors and hands its arguments to ``launcher`` (tests of what reaches the launcher)."""
    import contextlib
    import types

    from kdfast import fused

    monkeypatch.setattr(fused, "_C_cuda", launcher)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    return launcher
