"""Time and peak memory of every kdfast loss, per provider, over a sweep of B and C.

Providers (each where it can run on the device):
  eager          the reference (kdfast's torch backend: PyTorch ops, kdfast's soft rank)
  compiled       torch.compile of the reference
  torchsort      the eager reference with torchsort's soft rank (Spearman terms only)
  kdfast-cpu, kdfast-cuda, kdfast-triton   kdfast's fused backends
  liger          log-softmax + Liger-Kernel's LigerKLDIVLoss (kd_loss only, where installed)

Modes: forward (the loss with inputs that require grad: the fused kernels write the
gradient here), backward (autograd.grad of a built graph), forward+backward. Times are
medians with 20/80% quantiles; GB/s counts the bytes a loss must move (read student and
teacher, write the gradient) over the forward+backward time, next to the memory floor
(those bytes at the measured copy bandwidth). Peak memory is what forward+backward adds.
Inputs are random normal logits drawn on the device itself (a CUDA generator on a GPU).
Rows are appended to benchmarks/results/losses.csv (--output: another name there, or an
absolute path) as each loss is measured, so a run stopped part-way keeps what it
measured; a provider that fails on one loss is reported and the run goes on (exit
status 1 at the end).

Examples:
  python benchmarks/bench_losses.py                          # B=256, C=1000, fp32, CPU
  python benchmarks/bench_losses.py --preset cpu-sweep --plot benchmarks/results/losses_cpu.png
  python benchmarks/bench_losses.py --preset gpu             # B=4096, C=1000, bf16, CUDA, every provider
  python benchmarks/bench_losses.py --preset gpu-headline    # the same shape: eager, kdfast-triton, kdfast-cuda
  python benchmarks/bench_losses.py --preset gpu-large-c     # kd_loss, C = 32k ... 256k, bf16, CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import traceback

# numpy's bundled OpenBLAS starts a thread pool whose idle threads spin; on a small CPU
# they steal cycles from the code being timed (kdfast never calls BLAS).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
from common import append_rows, copy_bandwidth_gbps, device_name, measure_ms, peak_memory_mb  # noqa: E402

import kdfast  # noqa: E402
from kdfast import dispatch, reference  # noqa: E402

LOSSES = {
    "kd_loss": lambda s, t, y, backend, **kw: kdfast.kd_loss(s, t, 4.0, backend=backend, **kw),
    "pearson_loss": lambda s, t, y, backend, **kw: kdfast.pearson_loss(s, t, 1.0, backend=backend, **kw),
    "dist_loss": lambda s, t, y, backend, **kw: kdfast.dist_loss(s, t, 1.0, 1.0, 1.0, backend=backend, **kw),
    "spearman_loss": lambda s, t, y, backend, **kw: kdfast.spearman_loss(s, t, backend=backend, **kw),
    "cmkd_loss": lambda s, t, y, backend, **kw: kdfast.cmkd_loss(s, t, y, 4.0, backend=backend, **kw),
    "drkd_loss": lambda s, t, y, backend, **kw: kdfast.drkd_loss(s, t, y, 4.0, 1.0, backend=backend, **kw),
    "dkd_loss": lambda s, t, y, backend, **kw: kdfast.dkd_loss(s, t, y, 1.0, 8.0, 4.0, backend=backend, **kw),
}
#: The logit-standardized variants (Sun et al., CVPR 2024): ``kd_loss[standardize]`` … is
#: its loss with standardize=True; the backend limitations are their loss's.
for _name in ("kd_loss", "dist_loss", "cmkd_loss", "drkd_loss", "dkd_loss"):
    LOSSES[f"{_name}[standardize]"] = functools.partial(LOSSES[_name], standardize=True)


def operation(loss: str) -> str:
    """The kdfast op a LOSSES entry runs (``kd_loss`` for ``kd_loss[standardize]``)."""
    return loss.split("[", 1)[0]

SPEARMAN_LOSSES = ("spearman_loss", "cmkd_loss")
PROVIDERS = ("eager", "compiled", "torchsort", "kdfast-cpu", "kdfast-cuda", "kdfast-triton", "liger")
COLORS = dict(zip(PROVIDERS, ("tab:blue", "tab:purple", "tab:gray", "tab:orange", "tab:green", "tab:red",
                              "tab:brown")))
PRESETS = {
    "cpu-sweep": dict(device="cpu", dtype="float32",
                      shapes=["256x100", "256x300", "256x1000", "256x3000", "256x10000", "64x1000", "1024x1000"],
                      providers=["eager", "torchsort", "kdfast-cpu"]),
    "gpu": dict(device="cuda", dtype="bfloat16", shapes=["4096x1000"], providers=list(PROVIDERS)),
    # Stage 1 of benchmarks/run_gpu.sh: what choose_backends.py needs (kdfast-triton vs
    # kdfast-cuda) next to the eager reference; torch.compile is stage 2's.
    "gpu-headline": dict(device="cuda", dtype="bfloat16", shapes=["4096x1000"],
                         providers=["eager", "kdfast-triton", "kdfast-cuda"]),
    "gpu-large-c": dict(device="cuda", dtype="bfloat16", losses=["kd_loss"],
                        shapes=["8192x32768", "8192x65536", "8192x131072", "4096x262144"],
                        providers=["eager", "kdfast-cuda", "kdfast-triton", "liger"]),
}


@contextlib.contextmanager
def torchsort_soft_ranks():
    """The reference with torchsort.soft_rank in place of kdfast's (same conventions)."""
    import torchsort

    original = reference.soft_rank
    reference.soft_rank = torchsort.soft_rank
    try:
        yield
    finally:
        reference.soft_rank = original


def loss_function(provider: str, loss: str, device: torch.device, dtype: torch.dtype):
    """(callable(s, t, y) -> loss, context manager) for a provider, or a reason it cannot run."""
    fn = LOSSES[loss]
    if provider == "eager":
        return (lambda s, t, y: fn(s, t, y, "torch")), contextlib.nullcontext
    if provider == "compiled":
        # Every loss compiles the same lambda's code with another closure: without a reset,
        # Dynamo counts them as recompilations of one frame and stops at its limit (8).
        torch._dynamo.reset()
        return torch.compile(lambda s, t, y: fn(s, t, y, "torch"), fullgraph=True), contextlib.nullcontext
    if provider == "liger":
        if loss != "kd_loss":
            return "Liger-Kernel has a KL divergence, not the other losses (nor standardization)"
        if device.type != "cuda":
            return "Liger-Kernel's kernels run on CUDA"
        try:
            from liger_kernel.transformers import LigerKLDIVLoss
        except ImportError:
            return "liger-kernel is not installed"
        liger_kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        tau = 4.0  # as LOSSES["kd_loss"]

        def liger(s, t, y):
            log_p = torch.nn.functional.log_softmax(s / tau, dim=-1)
            log_q = torch.nn.functional.log_softmax(t / tau, dim=-1)
            return liger_kl(log_p, log_q) * tau**2

        return liger, contextlib.nullcontext
    if provider == "torchsort":
        if operation(loss) not in SPEARMAN_LOSSES:
            return "only the Spearman terms use a soft rank"
        try:
            import torchsort  # noqa: F401
        except ImportError:
            return "torchsort is not installed"
        if device.type != "cpu":
            return "torchsort's CUDA extension is not built here"
        return (lambda s, t, y: fn(s, t, y, "torch")), torchsort_soft_ranks
    backend = provider.split("-", 1)[1]
    reasons = dispatch.not_supported_reasons(backend, operation(loss), device, (dtype, dtype))
    if reasons:
        return "; ".join(reasons)
    return (lambda s, t, y: fn(s, t, y, backend)), contextlib.nullcontext


def draw_inputs(batch, classes, device, dtype):
    """(student, teacher, target) for one shape, drawn on ``device`` from a generator seeded 0.

    On a GPU a CUDA generator draws them in place: the large-C shapes hold up to 10^9
    logits per tensor, which the CPU would take long to draw and copy over. On the CPU
    the values are the ones this benchmark always used (the same generator calls).
    """
    generator = torch.Generator(device=device).manual_seed(0)
    teacher = (torch.randn(batch, classes, generator=generator, device=device) * 2.0).to(dtype)
    student = (teacher.float() + torch.randn(batch, classes, generator=generator, device=device)).to(dtype)
    target = torch.randint(0, classes, (batch,), generator=generator, device=device)
    return student, teacher, target


def run(shapes, providers, losses, device, dtype, reps, memory=True, on_rows=None):
    """Measure every (provider, shape, loss); returns (rows, failures).

    ``on_rows(rows)`` receives each loss's rows as soon as they are measured. A provider
    that raises on one loss is printed and listed in the failures; the run goes on.
    """
    rows, failures = [], []
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"device: {device_name(device)}; measured copy bandwidth {copy_gbps:.1f} GB/s")
    inputs = {}
    for batch, classes in shapes:
        inputs[batch, classes] = draw_inputs(batch, classes, device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the float32 intermediates of the draws
    # Providers outermost, torch.compile last: the kernels Inductor generates bring an
    # OpenMP runtime of their own whose spinning threads would slow what runs after them.
    for provider in sorted(providers, key=lambda p: p == "compiled"):
        for (batch, classes), (student, teacher, target) in inputs.items():
            moved = batch * classes * (2 * student.element_size() + teacher.element_size())
            floor_ms = moved / (copy_gbps * 1e9) * 1e3
            for loss in losses:
                made = loss_function(provider, loss, device, student.dtype)
                if isinstance(made, str):
                    continue
                failed = None
                try:
                    fn, context = made
                    s = student.detach().clone().requires_grad_()
                    with context():
                        forward = lambda: fn(s, teacher, target)  # noqa: E731
                        built = forward()
                        timings = {
                            "forward": measure_ms(forward, device, reps=reps),
                            "backward": measure_ms(lambda: torch.autograd.grad(built, s, retain_graph=True), device,
                                                   reps=reps),
                            "forward+backward": measure_ms(lambda: torch.autograd.grad(forward(), s), device,
                                                           reps=reps),
                        }
                        del built
                        peak = peak_memory_mb(lambda: torch.autograd.grad(forward(), s), device) if memory else None
                except Exception as error:  # noqa: BLE001 - reported, and the other measurements go on
                    failed = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
                    print(f"{loss:22s} {provider:13s} B={batch:5d} C={classes:6d}  FAILED: {failed}")
                    print("".join(traceback.format_exc().splitlines(keepends=True)[-12:]), end="")
                if failed is not None:  # past the except block, whose traceback held the failed call's tensors
                    failures.append(f"{loss} {provider} B={batch} C={classes}: {failed}")
                    s = built = forward = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                measured = []
                for mode, timing in timings.items():
                    full = mode == "forward+backward"
                    measured.append({
                        "loss": loss, "provider": provider, "mode": mode, "B": batch, "C": classes,
                        "dtype": str(dtype).replace("torch.", ""), **{k: round(v, 5) for k, v in timing.items()},
                        "gbps": round(moved / (timing["median_ms"] * 1e-3) / 1e9, 3) if full else "",
                        "memory_floor_ms": round(floor_ms, 5) if full else "",
                        "peak_mb": round(peak, 3) if full and peak is not None else "",
                        "device": device_name(device),
                    })
                rows.extend(measured)
                if on_rows is not None:
                    on_rows(measured)
                full = timings["forward+backward"]
                print(f"{loss:22s} {provider:13s} B={batch:5d} C={classes:6d}  fwd+bwd {full['median_ms']:9.3f} ms "
                      f"[{full['q20_ms']:.3f}, {full['q80_ms']:.3f}]  fwd {timings['forward']['median_ms']:8.3f}  "
                      f"bwd {timings['backward']['median_ms']:8.3f}" + (f"  peak {peak:7.2f} MB" if memory else ""))
    return rows, failures


def plot(rows, path):
    """Forward+backward time against C (at the most common B) and against B, per loss and provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The last measurement of each point (a results file may hold several runs).
    latest = {(r["loss"], r["provider"], r["mode"], int(r["B"]), int(r["C"])): r for r in rows}
    full = [r for r in latest.values() if r["mode"] == "forward+backward"]
    losses = sorted({r["loss"] for r in full}, key=list(LOSSES).index)
    batches = [int(r["B"]) for r in full]
    common_b = max(set(batches), key=batches.count)
    classes = [int(r["C"]) for r in full]
    common_c = max(set(classes), key=classes.count)
    figure, axes = plt.subplots(2, len(losses), figsize=(3.2 * len(losses), 6.6), squeeze=False)
    shown = set()
    for column, loss in enumerate(losses):
        for row_index, (fixed, varied, value) in enumerate((("B", "C", common_b), ("C", "B", common_c))):
            axis = axes[row_index][column]
            for provider in PROVIDERS:
                points = sorted((int(r[varied]), float(r["median_ms"])) for r in full
                                if r["loss"] == loss and r["provider"] == provider and int(r[fixed]) == value)
                if len(points) > 1:
                    axis.plot(*zip(*points), marker="o", color=COLORS[provider], label=provider)
                    shown.add(provider)
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel(f"{varied} ({fixed}={value})")
            axis.set_title(loss if row_index == 0 else "")
            axis.grid(True, which="both", alpha=0.3)
        axes[0][column].set_ylabel("fwd+bwd ms" if column == 0 else "")
    handles = [plt.Line2D([], [], color=COLORS[p], marker="o", label=p) for p in PROVIDERS if p in shown]
    figure.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8)
    figure.suptitle(f"kdfast losses, forward+backward, {full[0]['dtype']}, {full[0]['device']}, commit "
                    f"{full[0].get('commit', '?')}, {full[0].get('date', '')}", fontsize=9, x=0.3)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=110)
    print("wrote", path)


def latest_rows(csv_name):
    """The rows of the last run recorded in benchmarks/results/csv_name, or at that absolute
    path (same commit, date, device, dtype)."""
    import csv

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", csv_name)) as handle:
        rows = list(csv.DictReader(handle))
    last = rows[-1]
    keys = ("commit", "date", "device", "dtype")
    return [r for r in rows if all(r[k] == last[k] for k in keys)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shapes", nargs="+", default=["256x1000"], help="BxC pairs")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--output", default="losses.csv",
                        help="file name under benchmarks/results/, or an absolute path (rows are appended)")
    parser.add_argument("--plot", help="also draw the sweep as a PNG at this path")
    parser.add_argument("--replot", action="store_true",
                        help="measure nothing: draw --plot from the last run recorded in --output")
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            sys.exit("--replot needs --plot PATH")
        plot(latest_rows(args.output), args.plot)
        return
    if args.preset:
        defaults = parser.parse_args([])
        for key, value in PRESETS[args.preset].items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is available")
    shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes]
    written = []
    rows, failures = run(shapes, args.providers, args.losses, device, getattr(torch, args.dtype), args.reps,
                         memory=not args.no_memory, on_rows=lambda new: written.append(append_rows(args.output, new)))
    if written:
        print("appended to", written[-1])
    if args.plot and rows:
        plot(rows, args.plot)
    if failures:
        sys.exit(f"{len(failures)} measurement(s) failed:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    main()
