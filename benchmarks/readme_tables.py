"""Writes the README's generated tables from the result files in ``benchmarks/results/``.

    python benchmarks/readme_tables.py [--csv benchmarks/results/gpu_static.csv] [--readme README.md] [--check]

The README holds each generated table between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` markers; this script rewrites what lies between them, so a table can
never drift from the CSV it summarizes (``--check`` exits 1 when the README differs from
what it would write, for CI). Tables:

* ``gpu-static``: registers, spills, shared memory, warps per SM and compile time per
  kernel and class count (bf16 Triton rows; every dtype pair of a CUDA kernel, whose
  instantiations are compiled together);
* ``gpu-bytes``: passes over each input and bytes moved against the floor per loss of the
  Triton row kernel (bf16, student gradient; with the teacher's in brackets);
* ``sparse-error``: each loss's error with a cached top-k teacher, per k
  (``benchmarks/results/sparse_teacher_error.csv``);
* ``cache-accuracy``, ``cache-speed``: KD from a teacher cache against online KD, accuracy
  (``cache_accuracy.csv``) and images/s of the step (``teacher_cache_train.csv``).
* ``softrank``, ``data-loaders``, ``train-step``, ``reskd-bench``: the soft-rank, loader,
  training-step and gated-inference benchmarks (``softrank.csv``, ``data.csv``,
  ``train.csv``, ``reskd.csv``, in docs/benchmarks.md);
* ``cpu-sweep``: how the CPU kernels' time grows with C and B (``losses.csv``'s newest sweep);
* ``spearman-strength``: the Spearman terms' ε (``spearman_strength.csv``, in docs/losses.md);
* ``reskd-demo``: ``make reskd``'s table (``reskd_demo_digits.json``, in docs/reskd.md);
* ``demo``: ``make demo``'s table (``demo_digits.json``, the demo's ``results.json``);
* ``cpu-losses``: forward+backward time of every loss on the CPU at B = 256, C = 1000 per
  provider, with kdfast's speed-up (``losses.csv``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_CLASSES = ("100", "1000", "8192", "131072")
LOSSES = ("kd_loss", "drkd_loss", "pearson_loss(dim=1)", "pearson_loss(dim=0)", "dist_loss", "spearman_loss",
          "cmkd_loss(target)")


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _span(values, digits: int = 0) -> str:
    """'a' or 'a–b' over the distinct numbers in ``values`` ('' when none)."""
    numbers = sorted({round(v, digits) for v in map(_number, values) if v is not None})
    if not numbers:
        return ""
    text = [f"{v:.{digits}f}" if digits else f"{int(v)}" for v in (numbers[0], numbers[-1])]
    return text[0] if text[0] == text[1] else f"{text[0]}–{text[1]}"


def _latest(rows: list[dict]) -> list[dict]:
    """The rows of the newest commit in a results file (rows are appended in run order)."""
    return [row for row in rows if row["commit"] == rows[-1]["commit"]]


def _triton_layout(row: dict) -> str:
    config = row["config"]
    if row["kernel"] != "_fused_row_kernel":
        return ""
    rows = re.search(r"ROWS=(\d+)", config)
    return f"resident, {rows.group(1)} rows/program" if "RESIDENT" in config else "chunked"


def _cuda_group(kernel: str) -> str:
    """A CUDA kernel's name without its dtype template arguments (what groups its instantiations)."""
    if kernel.startswith("CUB:"):
        return re.sub(r"<.*", "", kernel)
    head, _, rest = kernel.partition("<")
    if not rest:
        return kernel
    layout = [a for a in rest.rstrip(">").split(",") if re.fullmatch(r"\s*\d+\s*", a)]
    return f"{head}<{','.join(a.strip() for a in layout)}>" if layout else head


def static_table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["status"] != "ok":
            continue
        if row["backend"] == "triton":
            if row["dtype"] != "bf16":
                continue
            if row["kernel"] == "_fused_row_kernel" and row["classes"] not in ROW_CLASSES:
                continue
            key = ("triton", row["kernel"], _triton_layout(row), row["classes"])
        else:
            key = ("cuda", _cuda_group(row["kernel"]), "", row["classes"])
        groups[key].append(row)

    def order(key):
        backend, kernel, layout, classes = key
        return (backend != "triton", kernel.startswith("CUB"), kernel, int(classes) if classes.isdigit() else -1,
                layout)

    lines = ["| backend | kernel | C | n | warps | registers | spilled bytes | shared bytes | warps/SM | compile s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(groups, key=order):
        backend, kernel, layout, classes = key
        members = groups[key]
        label = f"`{kernel}`" + (f" ({layout})" if layout else "")
        compile_s = _span([m["compile_s"] for m in members], 2)
        if backend == "cuda":
            compile_s = f"(file: {compile_s})"
        lines.append(" | ".join([
            f"| {backend}", label, classes, str(len(members)), _span([m["num_warps"] for m in members]),
            _span([m["registers"] for m in members]), _span([m["spill_bytes"] for m in members]),
            _span([m["shared_bytes"] for m in members]), _span([m["warps_per_sm"] for m in members]),
            compile_s + " |"]))
    first = rows[0]
    lines.append("")
    lines.append(f"Commit {first['commit']}, {first['date']}; static estimates (ptxas and the occupancy "
                 f"calculator's arithmetic for sm_90), not measurements. n: distinct compiled specializations "
                 f"(ranges over them).")
    return "\n".join(lines)


def bytes_table(rows: list[dict]) -> str:
    cells: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for row in rows:
        if row["backend"] != "triton" or row["kernel"] != "_fused_row_kernel" or row["dtype"] != "bf16":
            continue
        for launcher in row["launcher"].split("+"):
            teacher = launcher.endswith("[teacher grad]")
            loss = launcher.removesuffix("[teacher grad]")
            cells[(loss, row["classes"])]["teacher" if teacher else "student"] = row
    lines = ["| loss | " + " | ".join(f"C = {c}" for c in ROW_CLASSES) + " |",
             "| --- |" + " --- |" * len(ROW_CLASSES)]
    for loss in LOSSES:
        entries = []
        for classes in ROW_CLASSES:
            cell = cells.get((loss, classes), {})
            student = cell.get("student")
            if student is None or not student["floor_ratio"]:
                entries.append("—")
                continue
            passes = re.search(r"s (\d+)", student["input_passes"])
            count = int(passes.group(1)) if passes else 0
            text = f"{count} pass{'es' if count != 1 else ''}, {float(student['floor_ratio']):.2f}×"
            teacher = cell.get("teacher")
            if teacher is not None and teacher["floor_ratio"]:
                text += f" ({float(teacher['floor_ratio']):.2f}×)"
            entries.append(text)
        lines.append(f"| `{loss}` | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def sparse_error_table(rows: list[dict]) -> str:
    """Relative gradient (and loss) error of each loss with a cached top-k teacher, per k:
    the last run of ``benchmarks/sparse_teacher_error.py`` (rows of its newest commit)."""
    latest = _latest(rows)
    names = list(dict.fromkeys(row["loss"] for row in latest))
    by_key = {(row["loss"], row["k"]): row for row in latest}
    ks = sorted({int(row["k"]) for row in latest})
    first = latest[0]
    lines = ["| k | mass outside the top k, τ = 1 / τ = 4 | " + " | ".join(names) + " |",
             "| ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for k in ks:
        some = by_key[(names[0], str(k))]
        cells = []
        for name in names:
            row = by_key[(name, str(k))]
            grad, loss = float(row["grad_rel_error_median"]), float(row["loss_rel_error_median"])
            cells.append("exact" if grad == 0 and loss == 0 else f"{100 * grad:.3g} % ({100 * loss:.3g} %)")
        lines.append(f"| {k} | {100 * float(some['tail_mass_tau_1']):.2g} % / {100 * float(some['tail_mass_tau_4']):.2g} % | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Median over {first['batches']} batches of {first['batch']} synthetic ImageNet-like rows "
                 f"(C = {first['classes']}, teacher mean top-1 probability {first['teacher_top1_probability']}): "
                 f"relative error of the student gradient ‖g_k − g‖/‖g‖ (of the loss |L_k − L|/|L|) against the "
                 f"dense teacher. {first['device']}, commit {first['commit']}, {first['date']}; "
                 f"`python benchmarks/sparse_teacher_error.py`.")
    return "\n".join(lines)


def cache_accuracy_table(rows: list[dict]) -> str:
    """Online KD vs KD from teacher caches (benchmarks/cache_accuracy.py): top-1 per seed, mean ± std."""
    import statistics

    latest = _latest(rows)
    runs = list(dict.fromkeys(row["run"] for row in latest))
    lines = ["| teacher → student | run | top-1 per seed (%) | mean ± std |", "| --- | --- | --- | ---: |"]
    for run in runs:
        mine = sorted((row for row in latest if row["run"] == run), key=lambda row: int(row["seed"]))
        top1 = [float(row["top1"]) for row in mine]
        spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
        lines.append(f"| {mine[0]['teacher']} → {mine[0]['student']} | {run} | "
                     f"{', '.join(f'{v:.2f}' for v in top1)} | {statistics.mean(top1):.2f} ± {spread:.2f} |")
    first = latest[0]
    lines += ["", f"{first['epochs']} epochs, KD at τ = 4, digits as 32 px JPEGs (1257 train / 540 val, torch loader, "
              f"random-resized crops and flips, deterministic mode); the caches hold that seed's {first['epochs']} "
              f"epochs in fp16; one validation image is 0.19 points. {first['device']}, commit {first['commit']}, "
              f"{first['date']}; `python benchmarks/cache_accuracy.py`."]
    return "\n".join(lines)


def cache_speed_table(rows: list[dict]) -> str:
    """Images/s of the KD step online vs from a teacher cache (bench_train.py's +cache feeds)."""
    latest = _latest(rows)
    lines = ["| teacher → student | feed | online (images/s) | from the cache | speed-up | cache build | "
             "teacher inference |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in latest:
        if not row["feed"].endswith("+cache"):
            continue
        base = row["feed"].removesuffix("+cache")
        online = next(r for r in latest if r["feed"] == base and r["teacher"] == row["teacher"])
        cached, plain = float(row["images_per_s"]), float(online["images_per_s"])
        lines.append(f"| {row['teacher']} → {row['student']} | {base} | {plain:.0f} | {cached:.0f} | "
                     f"{cached / plain:.2f}× | {float(row['build_images_per_s']):.0f} | "
                     f"{float(row['teacher_inference_images_per_s']):.0f} |")
    first = latest[0]
    lines += ["", f"Median images/s of the whole KD step ({first['method']}, batch {first['batch_size']}, "
              f"{first['image_size']} px, top-{first['cache_top_k'] or next(r['cache_top_k'] for r in latest if r['cache_top_k'])} "
              f"cache); `synthetic` reuses one batch on the device (the step alone), `torch` reads the JPEG folder "
              f"with the torch loader. Build and teacher inference in images/s over the same loader. "
              f"{first['device']}, commit {first['commit']}, {first['date']}; `python benchmarks/bench_train.py "
              f"--preset digits-jpeg --teacher T --feeds synthetic synthetic+cache torch torch+cache "
              f"--output teacher_cache_train.csv`."]
    return "\n".join(lines)


def cpu_losses_table(rows: list[dict], batch: str = "256", classes: str = "1000") -> str:
    """Forward+backward ms per loss and provider on the CPU at B × C, fp32 (bench_losses.py):
    the last run at the newest commit that measured this point against torch.compile, with
    the speed-up's range over every run at that commit."""
    def here(row):
        return (row["B"], row["C"], row["dtype"], row["mode"]) == (batch, classes, "float32", "forward+backward") \
            and "cuda" not in row["provider"] and "triton" not in row["provider"]

    points = [row for row in rows if here(row)]
    # The headline runs: the newest commit that timed this point against torch.compile too
    # (the C/B sweep, which also passes through it, does not run torch.compile).
    commit = next(row["commit"] for row in reversed(points) if row["provider"] == "compiled")
    points = [row for row in points if row["commit"] == commit]
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for row in points:
        runs[row["loss"], row["provider"]].append(row)
    losses = list(dict.fromkeys(row["loss"] for row in points if row["provider"] == "kdfast-cpu"))
    count = max(len(runs[loss, "kdfast-cpu"]) for loss in losses)

    def ms(loss, provider):
        found = runs.get((loss, provider))
        return float(found[-1]["median_ms"]) if found else None

    def shown(value, bold=False):
        if value is None:
            return "—"
        text = f"{value:.2f}"
        return f"**{text}**" if bold else text

    lines = ["| loss | eager | torch.compile | torchsort composite | **kdfast cpu** | speed-up vs eager | "
             f"{'in ' + str(count) + ' runs | ' if count > 1 else ''}vs torch.compile | peak MB eager → kdfast |",
             "| --- | ---: | ---: | ---: | ---: | ---: | " + ("---: | " if count > 1 else "") + "---: | ---: |"]
    for loss in losses:
        eager, fused, compiled = ms(loss, "eager"), ms(loss, "kdfast-cpu"), ms(loss, "compiled")
        ratios = [float(e["median_ms"]) / float(f["median_ms"])
                  for e, f in zip(runs[loss, "eager"], runs[loss, "kdfast-cpu"])]
        peaks = [float(runs[loss, provider][-1]["peak_mb"]) for provider in ("eager", "kdfast-cpu")]
        peak = f"{peaks[0]:.1f} → {peaks[1]:.2f}"
        name = loss.replace("[standardize]", ", standardize=True")
        lines.append(f"| `{name}` | {shown(eager)} | {shown(compiled)} | {shown(ms(loss, 'torchsort'))} | "
                     f"{shown(fused, True)} | {eager / fused:.1f}× | "
                     + (f"{min(ratios):.1f}–{max(ratios):.1f}× | " if count > 1 else "")
                     + (f"{compiled / fused:.1f}× |" if compiled else "— |") + f" {peak} |")
    last = runs[losses[0], "kdfast-cpu"][-1]
    lines += ["", f"fp32, B = {batch}, C = {classes}, forward+backward, median ms (20/80% quantiles in "
              f"`benchmarks/results/losses.csv`); {last['device']}, commit {commit}, {last['date']}"
              + (f"; {count} runs of the benchmark at this commit, the table shows the last, the range column "
                 f"the speed-up in each" if count > 1 else "")
              + ". `python benchmarks/bench_losses.py --providers eager compiled torchsort kdfast-cpu --reps 50`."]
    return "\n".join(lines)


def demo_block(saved: dict) -> str:
    """``make demo``'s table from its committed results.json (benchmarks/results/demo_digits.json)."""
    from kdfast.demo import ONE_IMAGE, report_table

    settings = saved["settings"]
    return "\n".join([
        report_table(saved["results"], settings), "",
        f"{settings['student']} student on {settings['per_class']} images per class ({settings['epochs']} epochs, "
        f"batch 32), {settings['teacher']} teacher on all 1257 training images ({settings['teacher_epochs']} "
        f"epochs); {settings['seeds']} seeds; validation top-1 on 540 images, one image = {ONE_IMAGE:.2f} points. "
        f"Gains are the mean ± std over seeds of each seed's difference to ce (same initialization, data order and "
        f"subset). Whole demo {settings['seconds'] / 60:.1f} min on {settings['device']}, idle; commit "
        f"{settings['commit']}, {settings['date']}, PyTorch {settings['torch']}."])


def softrank_table(rows: list[dict]) -> str:
    """Soft rank / soft sort against torchsort, forward+backward ms (bench_softrank.py)."""
    rows = _latest(rows)
    at = {(r["op"], r["provider"], r["regularization"], r["mode"], r["n"]): float(r["median_ms"]) for r in rows}
    lines = ["| op | regularization | n | kdfast | torchsort | torchsort / kdfast | the row sort alone |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for n in sorted({r["n"] for r in rows}, key=int):
        for op in ("soft_rank", "soft_sort"):
            for reg in ("kl", "l2"):
                ours = at.get((op, "kdfast", reg, "forward+backward", n))
                theirs = at.get((op, "torchsort", reg, "forward+backward", n))
                if ours is None:
                    continue
                ratio = f"{theirs / ours:.2f}×" if theirs else "—"
                lines.append(f"| {op} | {reg} | {n} | {ours:.2f} | {f'{theirs:.2f}' if theirs else '—'} | {ratio} | "
                             f"{at[('sort', 'torch', '', 'forward', n)]:.2f} |")
    first = rows[0]
    lines += ["", f"fp32, B = {first['B']}, forward+backward, median ms; {first['device']}, commit {first['commit']}, "
              f"{first['date']}. `python benchmarks/bench_softrank.py`."]
    return "\n".join(lines)


def data_table(rows: list[dict]) -> str:
    """Images/s of each loader over the runs of the newest commit (bench_data.py)."""
    rows = _latest(rows)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    runs = [[r for r in rows if r["provider"] == p] for p in providers]
    count = min(len(r) for r in runs)
    names = {"dali-cpu": "DALI, CPU-only mode (`dali`, `device=\"cpu\"`)",
             "torch-cpu": "PyTorch fallback (`torch`, Pillow)",
             "dali-gpu": "DALI, GPU decode", "torch-gpu": "PyTorch fallback, GPU batches"}
    lines = ["| loader | " + " | ".join(f"run {i + 1}" for i in range(count)) + " |",
             "| --- | " + " | ".join("---:" for _ in range(count)) + " |"]
    for provider, measured in zip(providers, runs):
        lines.append(f"| {names.get(provider, provider)} | " + " | ".join(
            f"{float(r['images_per_s']):.0f} ({float(r['q20_images_per_s']):.0f}–{float(r['q80_images_per_s']):.0f})"
            for r in measured[:count]) + " |")
    if {"dali-cpu", "torch-cpu"} <= set(providers):
        dali, plain = runs[providers.index("dali-cpu")], runs[providers.index("torch-cpu")]
        lines.append("| DALI / PyTorch | " + " | ".join(
            f"{float(d['images_per_s']) / float(t['images_per_s']):.2f}×" for d, t in zip(dali, plain)) + " |")
    first = rows[0]
    lines += ["", f"images/s, median of the timed epochs (20–80 % quantiles); {first['images']} images per run, "
              f"{first['image_size']} px, batch {first['batch_size']}, {first['workers']} workers; {first['device']}, "
              f"DALI {first['dali']}, torch {first['torch']}, commit {first['commit']}, {first['date']}. "
              f"`python benchmarks/bench_data.py`."]
    return "\n".join(lines)


def train_table(rows: list[dict]) -> str:
    """The KD step's images/s per feed and its parts (bench_train.py)."""
    rows = _latest(rows)

    def ms(value):
        number = _number(value)
        return "—" if number is None or number != number else f"{number:.2f} ms"

    lines = ["| preset | method | teacher → student | feed | images/s (q20–q80) | of synthetic | teacher fwd | "
             "student fwd | loss | backward | optimizer |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        share = _number(r["of_synthetic"])
        loss = ms(r["loss_ms"])
        if _number(r.get("loss_share")) is not None:
            loss = f"**{loss} ({100 * float(r['loss_share']):.1f} %)**"
        lines.append(f"| {r['preset']} | {r['method']} | {r['teacher']} → {r['student']} | {r['feed']} | "
                     f"{float(r['images_per_s']):.0f} ({float(r['q20_images_per_s']):.0f}–"
                     f"{float(r['q80_images_per_s']):.0f}) | {'' if share is None else f'{100 * share:.1f} %'} | "
                     f"{ms(r['teacher_forward_ms'])} | {ms(r['student_forward_ms'])} | {loss} | "
                     f"{ms(r['backward_ms'])} | "
                     f"{ms(r['optimizer_ms'])} |")
    first = rows[0]
    lines += ["", f"batch {first['batch_size']}, {first['device']}, torch {first['torch']}, commit {first['commit']}, "
              f"{first['date']}; the parts are timed on the synthetic feed (a pass that synchronizes after each). "
              f"`python benchmarks/bench_train.py --preset digits` (and `--preset digits-jpeg`)."]
    return "\n".join(lines)


def reskd_bench_table(rows: list[dict]) -> str:
    """Gated vs full-chain wall-clock against the FLOPs' promise, over the runs of the newest
    commit (bench_reskd.py)."""
    rows = _latest(rows)
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    full_top1 = rows[0]["full_top1"]
    lines = ["| thresholds | FLOPs of the full chain | promised speed-up | measured speed-up (each run) | "
             f"measured / promised | top-1 (full {float(full_top1):.2f} %) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for setting in settings:
        runs = [r for r in rows if r["setting"] == setting]
        lines.append(f"| {setting} | {100 * float(runs[0]['flops_fraction']):.1f} % | "
                     f"{float(runs[0]['promised_speedup']):.2f}× | "
                     + " / ".join(f"{float(r['speedup']):.2f}" for r in runs) + "× | "
                     + " / ".join(f"{100 * float(r['speedup_vs_promise']):.0f}" for r in runs) + " % | "
                     f"{float(runs[0]['top1']):.2f} % |")
    first = rows[0]
    count = len([r for r in rows if r["setting"] == settings[0]])
    lines += ["", f"batch {first['batch']} ({first['chain']}), {count} run(s), {first['device']}, commit "
              f"{first['commit']}, {first['date']}; the gate alone {float(first['gate_us']):.0f} µs. "
              f"`python benchmarks/bench_reskd.py` (after `make reskd`)."]
    return "\n".join(lines)


def spearman_strength_table(rows: list[dict]) -> str:
    """ε = κ/C of the Spearman terms: gradient share and |soft − hard Spearman| (spearman_strength.py),
    ranges over both kinds of teacher-like logits."""
    import math

    rows = _latest(rows)

    def bound(values) -> str:
        worst = max(values)
        if worst < 1e-4:
            return "< 0.0001"
        digits = 4 if worst < 1e-3 else 3
        return f"≤ {math.ceil(worst * 10**digits) / 10**digits:.{digits}f}"

    lines = ["| ε · C | soft ranks carrying a gradient | \\|soft − hard Spearman\\|, C = 10 | C = 100 | "
             "C = 1000 … 10000 |", "| --- | --- | --- | --- | --- |"]
    for kappa in sorted({r["kappa"] for r in rows}, key=float):
        mine = [r for r in rows if r["kappa"] == kappa]
        shares = [100 * float(r["gradient_share"]) for r in mine]
        gap = lambda pick: bound([float(r["soft_hard_gap"]) for r in mine if pick(int(r["classes"]))])  # noqa: E731
        cells = [f"{float(kappa):g}" + (" (default)" if float(kappa) == 2 else ""),
                 f"{min(shares):.0f}–{max(shares):.0f}%", gap(lambda c: c == 10), gap(lambda c: c == 100),
                 gap(lambda c: c >= 1000)]
        if float(kappa) == 2:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0]
    lines += ["", f"64 rows per C, both kinds of logits; {first['device']}, commit {first['commit']}, {first['date']}. "
              f"`python benchmarks/spearman_strength.py`."]
    return "\n".join(lines)


def sweep_paragraph(rows: list[dict]) -> str:
    """How kdfast-cpu's forward+backward time grows with C (B = 256) and B (C = 1000), from
    the newest CPU sweep in losses.csv (the newest commit with a C = 10000 kdfast-cpu row)."""
    def cpu_full(row):
        return row["provider"] == "kdfast-cpu" and row["mode"] == "forward+backward" and "cuda" not in row["device"] \
            and "NVIDIA" not in row["device"]

    commit = next(r["commit"] for r in reversed(rows) if cpu_full(r) and r["C"] == "10000")
    points = {(r["loss"], int(r["B"]), int(r["C"])): float(r["median_ms"]) for r in rows
              if r["commit"] == commit and cpu_full(r)}
    losses = list(dict.fromkeys(loss for loss, _, _ in points))
    by_c = ", ".join(f"`{loss}` {points[loss, 256, 10000] / points[loss, 256, 1000]:.1f}×" for loss in losses
                     if (loss, 256, 10000) in points and (loss, 256, 1000) in points)
    by_b = ", ".join(f"`{loss}` {points[loss, 1024, 1000] / points[loss, 256, 1000]:.1f}×" for loss in losses
                     if (loss, 1024, 1000) in points and (loss, 256, 1000) in points)
    date = next(r["date"] for r in rows if r["commit"] == commit)
    return (f"The sweep (`losses.csv`, commit {commit}, {date}; B = 256 and C from 100 to 10,000; C = 1000 and B "
            f"from 64 to 1024) of the fused CPU kernels, forward+backward: from C = 1000 to 10,000 (10×) {by_c}; "
            f"from B = 256 to 1024 (4×) {by_b}. Past the fixed overhead of small sizes the cost grows about "
            f"linearly in B·C; the Spearman terms too, not as B·C·log C: both row sorts are radix sorts.")


def reskd_demo_block(saved: dict) -> str:
    """``make reskd``'s table from its committed results.json (benchmarks/results/reskd_demo_digits.json)."""
    from kdfast.reskd_demo import summary_table

    return summary_table(saved)


def render(readme: str, tables: dict[str, str]) -> str:
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README has no <!-- {name}:begin --> ... <!-- {name}:end --> markers")
        readme = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), readme)
    return readme


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "results", "gpu_static.csv"))
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                        help="the README; the pages of docs/ beside it are rewritten too")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's tables are not current")
    args = parser.parse_args(argv)
    with open(args.csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    def result_rows(name: str) -> list[dict]:
        with open(os.path.join(ROOT, "benchmarks", "results", name), newline="") as handle:
            return list(csv.DictReader(handle))

    def result_json(name: str) -> dict:
        with open(os.path.join(ROOT, "benchmarks", "results", name)) as handle:
            return json.load(handle)

    tables = {"gpu-static": static_table(rows), "gpu-bytes": bytes_table(rows),
              "sparse-error": sparse_error_table(result_rows("sparse_teacher_error.csv")),
              "cache-accuracy": cache_accuracy_table(result_rows("cache_accuracy.csv")),
              "cache-speed": cache_speed_table(result_rows("teacher_cache_train.csv")),
              "cpu-losses": cpu_losses_table(result_rows("losses.csv")),
              "demo": demo_block(result_json("demo_digits.json")),
              "reskd-demo": reskd_demo_block(result_json("reskd_demo_digits.json")),
              "softrank": softrank_table(result_rows("softrank.csv")),
              "data-loaders": data_table(result_rows("data.csv")),
              "train-step": train_table(result_rows("train.csv")),
              "reskd-bench": reskd_bench_table(result_rows("reskd.csv")),
              "spearman-strength": spearman_strength_table(result_rows("spearman_strength.csv")),
              "cpu-sweep": sweep_paragraph(result_rows("losses.csv"))}
    # Each table lives in one file: the README or a page of docs/.
    documents = [args.readme] + sorted(glob.glob(os.path.join(os.path.dirname(args.readme), "docs", "*.md")))
    current = {}
    for path in documents:
        with open(path) as handle:
            current[path] = handle.read()
    updated = dict(current)
    for name, table in tables.items():
        holders = [path for path in documents if f"<!-- {name}:begin -->" in current[path]]
        if len(holders) != 1:
            raise SystemExit(f"<!-- {name}:begin --> must be in exactly one of README.md and docs/*.md, found in "
                             f"{holders or 'none'}")
        updated[holders[0]] = render(updated[holders[0]], {name: table})
    stale = [path for path in documents if updated[path] != current[path]]
    if args.check:
        if stale:
            print(f"{', '.join(stale)}: the generated tables differ from benchmarks/results; run "
                  f"benchmarks/readme_tables.py")
            return 1
        return 0
    for path in stale:
        with open(path, "w") as handle:
            handle.write(updated[path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
