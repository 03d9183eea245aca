"""Static GPU evidence without a GPU: registers, spills, shared memory, occupancy on sm_90
and compile time of every kdfast GPU kernel, at the configurations its launchers use.

    python benchmarks/gpu_static.py [--classes 100 1000 8192 131072] [--dtypes bf16 fp32]
        [--output benchmarks/results/gpu_static.csv] [--no-cuda] [--jobs N] [--compile-timeout 300]

Writes one table per commit (the file is rewritten on every run, each row carrying the
commit and the date) and prints a summary: which configurations miss the project's target
(every kernel compiles for sm_90 in <= 5 s with zero spills at C = 1000, bf16). Missing
the target is evidence, not an error: the script still exits 0.

Triton kernels (``kdfast.kernels.kd_losses``, ``kdfast.kernels.gate``):

1. *Capture* (a subprocess with ``TRITON_INTERPRET=1``): every Triton kernel object of
   those modules (found by type, not by name) is replaced by a recorder; the public losses
   (``kd_loss``, ``pearson_loss`` dim=1 and dim=0, ``dist_loss``, ``spearman_loss``,
   ``cmkd_loss`` with a target, ``drkd_loss``, each with the student requiring grad; a few
   also with the teacher requiring grad) and ``kdfast.gate.gate_compact`` run on CPU
   tensors with ``backend="triton"``. Each launch is recorded (kernel, grid, arguments,
   constexprs, num_warps/num_stages) and, by default, *not executed*: the launchers only
   allocate their outputs and pass them on, so the downstream code runs on uninitialized
   values (``--execute`` runs the interpreted kernels instead; ``--check-skip`` compares the
   two ways at the smallest C). Kernel argument lists and launch configurations are thus
   the launchers' own, whatever the kernels become.
2. *Specialization* (a subprocess without the interpreter): each launch goes through
   Triton's own binder for sm_90 (``create_function_from_signature`` and
   ``JITFunction._pack_args``), with stand-in tensors whose addresses are 16-byte aligned
   plus the view's byte offset (as on a GPU, where the caching allocator's blocks are
   aligned): the signature, the ``tt.divisibility`` attributes of pointers and of ints
   divisible by 16, and the ints equal to 1 made constexpr, as a GPU launch would get them.
   Launches that give the same compiled kernel are merged (their launchers, classes and
   dtypes are listed on the rows). If Triton's private binder API changes, a plain
   reimplementation of the same rules is used (column ``specialization`` says which).
3. *Compile* (``--jobs`` worker processes without the interpreter, each warmed up once by
   compiling a trivial kernel, so that a process's first-compile set-up is not counted):
   ``triton.compile`` of an ``ASTSource`` for ``GPUTarget("cuda", 90, 32)`` with a fresh
   ``TRITON_CACHE_DIR`` per configuration and ``TRITON_ALWAYS_COMPILE=1``; a compile past
   ``--compile-timeout`` is recorded as a timeout (its worker is killed and replaced).
   ``compile_s`` is the wall time of that call, ``stages_s`` its split by Triton's stages
   (``cubin`` is ptxas), ``ptxas_s`` ptxas's own time. Registers, spills and static shared
   memory come from the log of Triton's own ``ptxas -v`` run (cross-checked with
   ``cuobjdump --dump-resource-usage`` on the cubin), Triton's dynamic shared memory from
   ``metadata.shared``, and the global loads/stores from the PTX (``ld.global...`` counted
   per vector width and type: static instructions, not executed ones).

CUDA kernels (``csrc/cuda/fused_loss.cu``): compiled once for sm_90 as setup.py does, with
``-Xptxas -v``; one row per kernel instantiation (CUB's DeviceSegmentedRadixSort kernels
included, labelled CUB), with threads per block from the kernel's ``__launch_bounds__``
(``EIATTR_MAX_THREADS`` in the cubin, else ``kThreads`` in the source), global loads and
stores counted in the SASS, and the classes each Spearman kernel serves (``plan_spearman``:
the in-block sorts' buckets up to ``kSpearmanBlockSortMax``, the segmented-sort path
beyond; static shared memory only). ``compile_s`` of CUDA rows is the whole file's
nvcc time (all instantiations together), repeated on each row; ``ptxas_s`` is ptxas's own
per-kernel time.

Compile times are those of this machine (see the ``host`` printed at the end), with
``--jobs`` compiles at a time; they depend on the CPU and its load, not on the GPU.
Occupancy is the CUDA occupancy calculator's arithmetic for sm_90 (``occupancy``), with the
largest shared-memory carveout; it ignores what only a run shows (e.g. the grid being
smaller than the GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import glob
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# ---------------------------------------------------------------------------------------
# Occupancy on sm_90 (H100 / H200).
#
# The per-SM limits of compute capability 9.0, from the CUDA C++ Programming Guide,
# "Compute Capabilities", Table "Technical Specifications per Compute Capability" (9.0
# column), and the allocation granularities of the CUDA Occupancy Calculator
# (CUDA_Occupancy_Calculator.xls, "GPU Data" sheet, compute capability 9.0), which
# cudaOccupancyMaxActiveBlocksPerMultiprocessor implements.
SM90_REGISTERS_PER_SM = 65536  # 32-bit registers per SM (also the most per block)
SM90_REGISTER_ALLOCATION_UNIT = 256  # registers are allocated per warp, in units of 256
SM90_WARP_ALLOCATION_GRANULARITY = 4  # warps get register files in groups of 4 per block
SM90_MAX_REGISTERS_PER_THREAD = 255
SM90_MAX_THREADS_PER_SM = 2048  # 64 resident warps
SM90_MAX_WARPS_PER_SM = 64
SM90_MAX_BLOCKS_PER_SM = 32
SM90_SHARED_PER_SM = 228 * 1024  # with the largest shared-memory carveout
SM90_MAX_SHARED_PER_BLOCK = 227 * 1024  # opt-in maximum per block
SM90_SHARED_RESERVED_PER_BLOCK = 1024  # reserved by the system for every resident block
SM90_SHARED_ALLOCATION_UNIT = 128
WARP_SIZE = 32

TARGET_CLASSES, TARGET_DTYPE, TARGET_COMPILE_S = 1000, "bf16", 5.0


def _ceil_to(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(registers: int, shared_bytes: int, threads: int) -> dict:
    """Resident blocks and warps per sm_90 SM for a kernel using ``registers`` per thread,
    ``shared_bytes`` of shared memory per block (static + dynamic) and ``threads`` per block,
    and which limit binds (``registers``, ``shared``, ``threads``, ``blocks``; ties joined
    by ``+``; ``none fit`` when a block cannot be resident at all)."""
    warps_per_block = -(-threads // WARP_SIZE)
    limits = {}
    if registers > SM90_MAX_REGISTERS_PER_THREAD:
        limits["registers"] = 0
    else:
        registers_per_warp = _ceil_to(max(registers, 1) * WARP_SIZE, SM90_REGISTER_ALLOCATION_UNIT)
        warps = SM90_REGISTERS_PER_SM // registers_per_warp
        warps -= warps % SM90_WARP_ALLOCATION_GRANULARITY
        limits["registers"] = warps // warps_per_block
    if shared_bytes > SM90_MAX_SHARED_PER_BLOCK:
        limits["shared"] = 0
    else:
        per_block = _ceil_to(shared_bytes + SM90_SHARED_RESERVED_PER_BLOCK, SM90_SHARED_ALLOCATION_UNIT)
        limits["shared"] = SM90_SHARED_PER_SM // per_block
    limits["threads"] = min(SM90_MAX_THREADS_PER_SM // threads, SM90_MAX_WARPS_PER_SM // warps_per_block) \
        if threads <= 1024 else 0
    limits["blocks"] = SM90_MAX_BLOCKS_PER_SM
    blocks = min(limits.values())
    binding = "+".join(name for name, value in limits.items() if value == blocks)
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps_per_block,
            "occupancy_limit": binding if blocks > 0 else f"none fit ({binding})"}


# ---------------------------------------------------------------------------------------
# Step 1: capture the launches (runs in a subprocess with TRITON_INTERPRET=1).

KERNEL_MODULES = ("kdfast.kernels.kd_losses", "kdfast.kernels.gate")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _describe(value) -> dict:
    """A JSON description of a launch argument, enough to rebuild what Triton specializes on."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"kind": "tensor", "dtype": str(value.dtype).replace("torch.", ""), "shape": list(value.shape),
                "stride": list(value.stride()), "byte_offset": value.storage_offset() * value.element_size()}
    if isinstance(value, bool):
        return {"kind": "bool", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": value}
    if isinstance(value, float):
        return {"kind": "float", "value": value}
    if value is None:
        return {"kind": "none"}
    if isinstance(value, str):
        return {"kind": "str", "value": value}
    inner = getattr(value, "value", None)  # tl.constexpr
    if isinstance(inner, (bool, int, float, str)) or inner is None and hasattr(value, "value"):
        described = _describe(inner)
        described["constexpr"] = True
        return described
    return {"kind": "unsupported", "repr": repr(value)[:200]}


def _scenarios(teacher_grad_all: bool):
    """(name, needs_spearman, teacher_grad, call(kdfast, s, t, y)) for every public op."""
    def loss(name, **kw):
        return lambda kd, s, t, y: getattr(kd, name)(s, t, backend="triton", **kw)

    losses = [
        ("kd_loss", False, loss("kd_loss")),
        ("pearson_loss(dim=1)", False, loss("pearson_loss", dim=1)),
        ("pearson_loss(dim=0)", False, loss("pearson_loss", dim=0)),
        ("dist_loss", False, loss("dist_loss")),
        ("spearman_loss", True, loss("spearman_loss")),
        ("cmkd_loss(target)", True, lambda kd, s, t, y: kd.cmkd_loss(s, t, y, backend="triton")),
        ("drkd_loss", False, lambda kd, s, t, y: kd.drkd_loss(s, t, y, backend="triton")),
    ]
    # The teacher-gradient specialization: by default for the simplest and the fullest row
    # kernel (kd, cmkd); --teacher-grad-all for every loss.
    with_teacher = [entry for entry in losses if teacher_grad_all or entry[0] in ("kd_loss", "cmkd_loss(target)")]
    out = [(name, spearman, False, call) for name, spearman, call in losses]
    out += [(name + "[teacher grad]", spearman, True, call) for name, spearman, call in with_teacher]
    out.append(("gate_compact", False, None,
                lambda kd, s, t, y: importlib.import_module("kdfast.gate").gate_compact(
                    s.detach(), torch_arange(s.shape[0]), 0.5, backend="triton")))
    return out


def torch_arange(n):
    import torch

    return torch.arange(n, dtype=torch.int64)


def _capture_in_process(classes: list[int], dtypes: list[str], batch: int, execute: bool,
                        teacher_grad_all: bool) -> dict:
    """Runs the public ops under the interpreter with every Triton kernel replaced by a
    recorder; returns {"launches": [...], "notes": [...], "unlaunched": [...]}."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the capture needs TRITON_INTERPRET=1 set before triton is imported")
    import torch
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, KernelInterface

    import kdfast

    launches, notes = [], []
    context = {"scenario": None, "classes": None, "dtype": None}

    class Recorder:
        """Stands for a Triton kernel: ``kernel[grid](...)`` records the launch (and runs
        it when ``execute``); a device-function call or any attribute goes to the original."""

        def __init__(self, original, module: str, name: str):
            self._original, self._module, self._name = original, module, name
            self.launched = 0

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                self.launched += 1
                launches.append({
                    **context, "module": self._module, "kernel": self._name,
                    "grid": [int(g) for g in grid] if isinstance(grid, (tuple, list)) else repr(grid),
                    "args": [_describe(a) for a in args],
                    "kwargs": {k: _describe(v) for k, v in kwargs.items()},
                })
                if execute:
                    return self._original[grid](*args, **kwargs)
                return None
            return launch

        def __call__(self, *args, **kwargs):
            return self._original(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._original, name)

    recorders = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for attribute, value in list(vars(module).items()):
            if isinstance(value, (InterpretedFunction, JITFunction)):
                fn = value.fn
                home = getattr(fn, "__module__", module_name)
                recorder = Recorder(value, home, fn.__name__)
                setattr(module, attribute, recorder)
                recorders[(module_name, attribute)] = recorder
            elif isinstance(value, KernelInterface):
                notes.append(f"{module_name}.{attribute} is a {type(value).__name__} (autotuner/heuristics?): "
                             "not recorded, its launches run interpreted")
    kd_losses = importlib.import_module("kdfast.kernels.kd_losses")
    max_spearman = getattr(kd_losses, "MAX_SPEARMAN_CLASSES", None)

    generator = torch.Generator().manual_seed(0)
    for c in classes:
        for dtype_name in dtypes:
            dtype = getattr(torch, DTYPES[dtype_name])
            for name, needs_spearman, teacher_grad, call in _scenarios(teacher_grad_all):
                if needs_spearman and max_spearman is not None and c > max_spearman:
                    if dtype_name == dtypes[0]:
                        notes.append(f"{name} skipped at C={c}: the Triton backend computes the Spearman terms "
                                     f"for at most MAX_SPEARMAN_CLASSES={max_spearman} classes")
                    continue
                context.update(scenario=name, classes=c, dtype=dtype_name)
                student = torch.randn(batch, c, generator=generator).to(dtype).requires_grad_(teacher_grad is not None)
                teacher = torch.randn(batch, c, generator=generator).to(dtype).requires_grad_(bool(teacher_grad))
                target = torch.randint(0, c, (batch,), generator=generator)
                before = len(launches)
                try:
                    call(kdfast, student, teacher, target)
                except Exception as error:  # an op that cannot run at this shape: no launches of it count
                    del launches[before:]
                    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    notes.append(f"{name} at C={c} {dtype_name}: {type(error).__name__}: {message[:300]}")
    unlaunched = sorted(f"{module}.{attribute}" for (module, attribute), r in recorders.items() if not r.launched)
    return {"launches": launches, "notes": notes, "unlaunched": unlaunched, "batch": batch, "execute": execute}


def _python() -> str:
    return sys.executable


def _run_phase(args: list[str], env: dict, timeout: float, what: str, retries: int = 2) -> subprocess.CompletedProcess:
    """Runs this script in a subprocess; retries a failed start (kdfast may be being rebuilt
    by someone else: an import can fail for a moment)."""
    for attempt in range(retries + 1):
        result = subprocess.run([_python(), os.path.abspath(__file__), *args], env=env, capture_output=True,
                                text=True, timeout=timeout, cwd=ROOT)
        if result.returncode == 0:
            return result
        if attempt < retries and ("ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr):
            time.sleep(10)
            continue
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{result.stderr[-6000:]}")
    raise AssertionError("unreachable")


def _env(interpret: bool, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.update(extra)
    return env


def capture_launches(classes: list[int], dtypes: list[str], batch: int = 64, execute: bool = False,
                     teacher_grad_all: bool = False, timeout: float = 1800) -> dict:
    """Step 1 in a subprocess under Triton's interpreter (see _capture_in_process)."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "launches.json")
        argv = ["--_capture", out, "--classes", *map(str, classes), "--dtypes", *dtypes, "--batch", str(batch)]
        argv += ["--execute"] * execute + ["--teacher-grad-all"] * teacher_grad_all
        _run_phase(argv, _env(True), timeout, "capturing the launches")
        with open(out) as handle:
            return json.load(handle)


# ---------------------------------------------------------------------------------------
# Step 2: Triton's specialization of each launch for sm_90 (no interpreter).

class _StandInTensor:
    """What Triton's launch specialization reads of a tensor: its dtype and its address,
    here an aligned base plus the view's byte offset."""

    def __init__(self, dtype, byte_offset: int):
        self.dtype = dtype
        self._address = (1 << 20) + byte_offset

    def data_ptr(self) -> int:
        return self._address


def _rebuild(described: dict):
    import torch

    kind = described["kind"]
    if kind == "tensor":
        return _StandInTensor(getattr(torch, described["dtype"]), described["byte_offset"])
    if kind in ("int", "float", "bool", "str"):
        return described["value"]
    if kind == "none":
        return None
    raise TypeError(f"cannot rebuild a launch argument: {described.get('repr')}")


_TRITON_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int64": "i64",
                  "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "u1"}


def _manual_specialization(kernel, launch: dict):
    """The same rules as Triton 3.x's launch binder, for when its private API changes:
    tensors '*<dtype>' (divisibility 16 when 16-byte aligned), ints i32/i64 (1 made
    constexpr, divisibility 16 when divisible), floats fp32, bools u1, None constexpr."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    names = list(inspect.signature(kernel.fn).parameters)
    bound = dict(zip(names, launch["args"]))
    options = {}
    for key, value in launch["kwargs"].items():
        (bound if key in names else options)[key] = value
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr} if hasattr(kernel, "params") else set()
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(names):
        described = bound.get(name)
        if described is None:
            continue  # a default: left to the compiler
        value = _rebuild(described)
        kind = described["kind"]
        if name in constexpr_names or described.get("constexpr"):
            signature[name], constexprs[(index,)] = "constexpr", value
        elif kind == "tensor":
            signature[name] = "*" + _TRITON_DTYPES[described["dtype"]]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif kind == "int" and value == 1:
            signature[name], constexprs[(index,)] = "constexpr", 1
        elif kind == "int":
            signature[name] = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif kind == "float":
            signature[name] = "fp32"
        elif kind == "bool":
            signature[name] = "u1"
        elif kind == "none":
            signature[name], constexprs[(index,)] = "constexpr", None
        else:
            signature[name], constexprs[(index,)] = "constexpr", value
    parsed = backend.parse_options({k: _rebuild(v) for k, v in options.items()})
    return parsed, signature, constexprs, attrs


def specialize(launch: dict):
    """(kernel JITFunction, options, signature, constexprs, attrs, method) of a recorded
    launch, as Triton's launcher would compute them on an sm_90 GPU."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    try:
        backend = make_backend(GPUTarget("cuda", 90, 32))
        args = [_rebuild(a) for a in launch["args"]]
        kwargs = {k: _rebuild(v) for k, v in launch["kwargs"].items()}
        # As JITFunction.run does before binding.
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization,
                                                                  options)
        method = "triton binder"
    except Exception as error:  # noqa: BLE001 - a private API: fall back to the same rules
        options, signature, constexprs, attrs = _manual_specialization(kernel, launch)
        method = f"manual ({type(error).__name__})"
    return kernel, options, signature, constexprs, attrs, method


def _spec_summary(kernel, options, signature, constexprs, attrs, method) -> dict:
    """The JSON-able facts of a specialization: its dedup key and its description."""
    names = list(signature)
    constants = {}
    for path, value in constexprs.items():
        name = names[path[0]] if len(path) == 1 else str(path)
        constants[name] = value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)
    divisible = sorted(names[path[0]] for path, values in attrs.items()
                       if len(path) == 1 and any(v[0] == "tt.divisibility" for v in values))
    option_values = {k: repr(v) for k, v in sorted(vars(options).items())}
    key = json.dumps([kernel.fn.__module__, kernel.fn.__name__, signature, sorted(map(str, constants.items())),
                      divisible, option_values])
    pointers = [n for n, t in signature.items() if t.startswith("*")]
    ints = [n for n, t in signature.items() if t in ("i32", "i64", "u64")]
    return {
        "key": key, "signature": signature, "constexprs": constants, "method": method,
        "num_warps": getattr(options, "num_warps", None), "num_stages": getattr(options, "num_stages", None),
        "div16_ints": [n for n in ints if n in divisible],
        "unaligned_pointers": [n for n in pointers if n not in divisible],
        "untyped": [n for n, t in signature.items() if not t],
    }


def _specialize_main(in_path: str, out_path: str) -> None:
    with open(in_path) as handle:
        launches = json.load(handle)
    out = []
    for launch in launches:
        try:
            out.append(_spec_summary(*specialize(launch)))
        except Exception as error:  # noqa: BLE001 - reported on the row
            out.append({"key": json.dumps([launch["module"], launch["kernel"], "error", repr(error)]),
                        "error": f"{type(error).__name__}: {error}"[:500]})
    with open(out_path, "w") as handle:
        json.dump(out, handle)


def specialize_launches(launches: list[dict], timeout: float = 600) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        in_path, out_path = os.path.join(folder, "in.json"), os.path.join(folder, "out.json")
        with open(in_path, "w") as handle:
            json.dump(launches, handle)
        _run_phase(["--_specialize", in_path, out_path], _env(False), timeout, "specializing the launches")
        with open(out_path) as handle:
            return json.load(handle)


# ---------------------------------------------------------------------------------------
# Step 3: compile one kernel configuration for sm_90 and read its resources.

_PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes cumulative stack size)?"
                         r"(?:, (\d+) bytes smem)?(?:, (\d+) bytes cmem\[\d+\])?")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_TIME = re.compile(r"Compile time = ([\d.]+) ms")
_PTXAS_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?([^\s']+)'?")


def parse_ptxas_log(text: str) -> dict[str, dict]:
    """Per entry function of a ``ptxas -v`` log: registers, spill stores/loads, stack,
    static shared memory (smem) and ptxas's own compile time in seconds."""
    functions: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        entry = _PTXAS_ENTRY.search(line)
        if entry:
            current = functions.setdefault(entry.group(1), {})
            continue
        if current is None:
            continue
        if m := _PTXAS_SPILLS.search(line):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif m := _PTXAS_USED.search(line):
            current.update(registers=int(m.group(1)), barriers=int(m.group(2) or 0),
                           smem=int(m.group(4) or 0), cmem=int(m.group(5) or 0))
        elif m := _PTXAS_TIME.search(line):
            current["ptxas_s"] = float(m.group(1)) / 1e3
    return functions


_PTX_GLOBAL = re.compile(r"\b(ld|st|atom|red)\.global((?:\.[A-Za-z0-9_:]+)*)")
_SASS_GLOBAL = re.compile(r"(?<![.\w])(LDG|STG|ATOMG|REDG)((?:\.[A-Z0-9_]+)*)\b")  # not BAR.RED


def ptx_global_accesses(ptx: str) -> tuple[str, str]:
    """("ld.b16:12, ld.v4.b32:3", "st...") : the PTX's global loads and stores (atomics and
    reductions with the stores) by vector width and type, cache hints dropped."""
    loads, stores = Counter(), Counter()
    for op, modifiers in _PTX_GLOBAL.findall(ptx):
        parts = [p for p in modifiers.split(".") if p]
        kept = [p for p in parts if re.fullmatch(r"v\d|[bsuf]\d+|add|max|min|cas|exch|inc|dec|and|or|xor", p)]
        label = ".".join([op, *kept])
        (loads if op == "ld" else stores)[label] += 1
    return _counts(loads), _counts(stores)


def sass_global_accesses(sass: str) -> tuple[str, str]:
    """The same from SASS (``LDG.E.128``, ``STG.E.U16``, ...): width kept (32 when none)."""
    loads, stores = Counter(), Counter()
    for op, modifiers in _SASS_GLOBAL.findall(sass):
        parts = [p for p in modifiers.split(".") if p]
        width = [p for p in parts if re.fullmatch(r"U8|S8|U16|S16|64|128|32", p)] or ["32"]
        kept = [p for p in parts if p in ("ADD", "MAX", "MIN", "CAS", "EXCH", "F32", "F64", "FTZ")]
        label = ".".join([op, *kept, *width])
        (loads if op == "LDG" else stores)[label] += 1
    return _counts(loads), _counts(stores)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k}:{v}" for k, v in sorted(counter.items())) or "-"


def _triton_tool(name: str) -> str | None:
    """A CUDA tool Triton bundles (backends/nvidia/bin), else one on PATH."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which(name)


def _warm_up_compiler(folder: str) -> None:
    """Compiles a trivial kernel once, so that the timed compile does not pay the process's
    first-compile set-up (loading the backend, LLVM, the first ptxas start)."""
    import importlib.util

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    path = os.path.join(folder, "kdfast_gpu_static_warmup.py")
    with open(path, "w") as handle:
        handle.write("import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
                     "def warmup_kernel(x_ptr, n, BLOCK: tl.constexpr):\n"
                     "    offs = tl.arange(0, BLOCK)\n"
                     "    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)\n")
    spec = importlib.util.spec_from_file_location("kdfast_gpu_static_warmup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    triton.compile(ASTSource(fn=module.warmup_kernel, signature={"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                             constexprs={"BLOCK": 128}), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def compile_for_sm90(launch: dict) -> dict:
    """Compiles a recorded launch for sm_90 in this process (no interpreter; a fresh
    TRITON_CACHE_DIR for it, TRITON_ALWAYS_COMPILE set by the worker's parent) and reads
    its resources."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result: dict = {}
    folder = tempfile.mkdtemp(prefix="kdfast_gpu_static_")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "cache")  # read by Triton at each compile
    try:
        kernel, options, signature, constexprs, attrs, method = specialize(launch)
        stage_times = {}

        def listener(*, src, metadata, metadata_group, times, cache_hit):
            stage_times["ir"] = times.ir_initialization / 1e6
            for stage, micros in times.lowering_stages:
                stage_times[stage] = micros / 1e6

        with contextlib.suppress(Exception):
            knobs.compilation.listener = listener
        knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v; print the log (captured here)
        log = io.StringIO()
        begin = time.perf_counter()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32), options=vars(options))
        result["compile_s"] = time.perf_counter() - begin
        result["stages"] = stage_times
        name = compiled.metadata.name
        resources = parse_ptxas_log(log.getvalue()).get(name)
        ptx = compiled.asm.get("ptx", "")
        cubin = compiled.asm.get("cubin", b"")
        cubin_path = os.path.join(folder, "kernel.cubin")
        with open(cubin_path, "wb") as handle:
            handle.write(cubin)
        if resources is None:  # no log: run Triton's ptxas on the PTX ourselves
            ptx_path = os.path.join(folder, "kernel.ptx")
            with open(ptx_path, "w") as handle:
                handle.write(ptx)
            arch = re.search(r"\.target\s+(sm_\w+)", ptx)
            run = subprocess.run([_triton_tool("ptxas"), "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name={arch.group(1) if arch else 'sm_90a'}", ptx_path, "-o",
                                  os.path.join(folder, "again.cubin")], capture_output=True, text=True)
            resources = parse_ptxas_log(run.stdout + run.stderr).get(name, {})
            result["resources_from"] = "ptxas -v on the PTX (rerun)"
        else:
            result["resources_from"] = "Triton's ptxas -v log"
        cuobjdump = _triton_tool("cuobjdump")
        if cuobjdump:
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin_path], capture_output=True, text=True)
            if m := re.search(r"REG:(\d+).*?SHARED:(\d+)", usage.stdout):
                result["cuobjdump_registers"], result["cuobjdump_shared"] = int(m.group(1)), int(m.group(2))
        loads, stores = ptx_global_accesses(ptx)
        result["bytes_model"] = _bytes_model(kernel, signature, constexprs, compiled, ptx)
        target = re.search(r"\.target\s+(\S+)", ptx)
        result.update(
            name=name, method=method, registers=resources.get("registers"),
            spill_stores=resources.get("spill_stores"), spill_loads=resources.get("spill_loads"),
            stack=resources.get("stack"), static_shared=resources.get("smem", 0), ptxas_s=resources.get("ptxas_s"),
            dynamic_shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
            num_ctas=getattr(compiled.metadata, "num_ctas", 1), global_loads=loads, global_stores=stores,
            target_arch=target.group(1) if target else None, status="ok")
    except Exception as error:  # noqa: BLE001 - reported on the row
        result.update(status=f"error: {type(error).__name__}: {str(error).strip()[:400]}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def _bytes_model(kernel, signature, constexprs, compiled, ptx) -> dict:
    """bytes_model.py's reading of a compiled kernel: for the row kernel its passes, bytes
    per row against the floor and the PTX check; for the others the static tile loads per
    pointer argument (their loops run over rows or sorted rows, not a model of one row)."""
    import bytes_model

    ttgir = compiled.asm.get("ttgir", "")
    names = list(signature)
    named = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    if kernel.fn.__name__ == "_fused_row_kernel":
        element = bytes_model._ELEMENT_BYTES.get(signature["s_ptr"].lstrip("*").replace("fp", "f"), 0)
        return bytes_model.row_kernel_model(named, element, compiled.metadata.num_warps * WARP_SIZE, ttgir, ptx,
                                            names)
    accesses = bytes_model.ttgir_accesses(ttgir)
    sites = [f"{name[:-4] if name.endswith('_ptr') else name} {entry['tile_loads'] + entry['row_loads']}"
             for name, entry in accesses.items() if entry["tile_loads"] + entry["row_loads"]]
    return {"input_passes": "load sites: " + ", ".join(sites) if sites else ""}


_MAGIC = "@@kdfast-gpu-static@@"


def _worker_main() -> None:
    """A compile worker: warms the compiler up once, then compiles the launch of each JSON
    line on stdin, writing the result to the file the line names and a magic line on
    stdout when done (other output, e.g. from native code, is ignored by the parent)."""
    try:
        with tempfile.TemporaryDirectory(prefix="kdfast_gpu_static_warmup_") as folder:
            os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "cache")
            with contextlib.redirect_stdout(io.StringIO()):
                _warm_up_compiler(folder)
                for module in KERNEL_MODULES:  # imported here, not inside the first timed task
                    importlib.import_module(module)
        print(_MAGIC, "ready", flush=True)
    except Exception as error:  # noqa: BLE001 - the parent reports it
        print(_MAGIC, "failed", json.dumps(f"{type(error).__name__}: {error}"[:1000]), flush=True)
        return
    for line in sys.stdin:
        if not line.strip():
            continue
        task = json.loads(line)
        result = compile_for_sm90(task["launch"])
        with open(task["out"], "w") as handle:
            json.dump(result, handle)
        print(_MAGIC, "done", task["out"], flush=True)


class _Worker:
    """A compile worker process (this script with --_compile-worker) that this process started."""

    def __init__(self, folder: str, start_timeout: float = 300):
        import queue
        import threading

        self.stderr = open(os.path.join(folder, f"worker-{time.monotonic_ns()}.err"), "w+")
        env = _env(False, TRITON_ALWAYS_COMPILE="1", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen([_python(), os.path.abspath(__file__), "--_compile-worker"], env=env, cwd=ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue = queue.Queue()

        def read():
            for line in self.process.stdout:
                if line.startswith(_MAGIC):
                    self.lines.put(line[len(_MAGIC):].split(None, 1))
            self.lines.put(None)  # exited

        threading.Thread(target=read, daemon=True).start()
        message = self._next(start_timeout)
        if not message or message[0] != "ready":
            self.close()
            detail = message[1] if message and len(message) > 1 else self._stderr_tail()
            raise RuntimeError(f"the compile worker did not start: {detail}")

    def _next(self, timeout: float):
        import queue

        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return "timeout"

    def _stderr_tail(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()[-600:].strip()

    def compile(self, launch: dict, out_path: str, timeout: float) -> dict:
        self.process.stdin.write(json.dumps({"launch": launch, "out": out_path}) + "\n")
        self.process.stdin.flush()
        # The wait allows for the specialization and the reading of the results around the
        # compile; the compile's own time is compared with the limit by the caller.
        message = self._next(timeout + 30)
        if message == "timeout":
            self.close()
            return {"status": f"timeout (> {timeout:g} s)", "compile_s": None}
        if message is None or not os.path.exists(out_path):
            status = self.process.poll()
            tail = self._stderr_tail()
            self.close()
            return {"status": f"error: compile worker exited ({status}): {tail[-400:]}"}
        with open(out_path) as handle:
            return json.load(handle)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # our own child, by its handle
        self.process.wait()
        self.stderr.close()


def compile_all(launches: dict[str, dict], jobs: int, timeout: float, progress=print) -> dict[str, dict]:
    """Compiles every launch (key -> launch) for sm_90 in ``jobs`` worker processes; a
    compile past ``timeout`` seconds is recorded as a timeout and its worker replaced."""
    import threading

    keys = list(launches)
    results: dict[str, dict] = {}
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="kdfast_gpu_static_results_") as folder:
        def slot():
            worker = None
            while True:
                with lock:
                    if not keys:
                        break
                    key = keys.pop(0)
                launch = launches[key]
                try:
                    if worker is None or not worker.alive:
                        worker = _Worker(folder)
                    out_path = os.path.join(folder, f"result-{time.monotonic_ns()}.json")
                    result = worker.compile(launch, out_path, timeout)
                except Exception as error:  # noqa: BLE001 - reported on the row
                    worker, result = None, {"status": f"error: {error}"[:500]}
                if worker is not None and not worker.alive:
                    worker = None
                if result.get("compile_s") is not None and result["compile_s"] > timeout:
                    result["status"] = f"timeout (> {timeout:g} s, finished in {result['compile_s']:.1f} s)"
                with lock:
                    results[key] = result
                    progress(f"  [{len(results)}/{len(launches)}] {launch['kernel']} C={launch['classes']} "
                             f"{launch['dtype']}: {result.get('status')} "
                             f"{(result.get('compile_s') or 0):.1f} s")
            if worker is not None:
                worker.close()

        threads = [threading.Thread(target=slot) for _ in range(max(1, min(jobs, len(keys))))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return results


# ---------------------------------------------------------------------------------------
# The CUDA kernels.

_CUDA_TYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "double": "fp64"}


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short_cuda_name(demangled: str) -> tuple[str, bool]:
    """'fused_row_kernel<__nv_bfloat16,__nv_bfloat16>' from the demangled signature, and
    whether it is one of CUB's kernels."""
    name = demangled[5:] if demangled.startswith("void ") else demangled
    name = name.replace("(anonymous namespace)::", "")
    depth = 0
    for index, char in enumerate(name):  # the parameter list: the first '(' outside <...>
        if char == "<":
            depth += 1
        elif char == ">":
            depth -= 1
        elif char == "(" and depth == 0 and index > 0:
            name = name[:index]
            break
    is_cub = name.startswith("cub::")
    name = re.sub(r"\bcub::CUB_\w+::", "", name)
    name = re.sub(r"\b(kdfast::cuda::|detail::(radix_sort::|radix::)?)", "", name)
    return name.replace(", ", ","), is_cub


def _cuda_constant(source: str, name: str) -> int | None:
    """The value of ``constexpr <type> name = <expression>;`` in the source, when the
    expression is arithmetic on literals and sizeof of fundamental types."""
    match = re.search(rf"constexpr\s+[\w:]+\s+{name}\s*=\s*([^;]+);", source)
    if not match:
        return None
    sizes = {"double": 8, "int64_t": 8, "uint64_t": 8, "float": 4, "int32_t": 4, "uint32_t": 4, "int": 4,
             "int16_t": 2, "__half": 2, "__nv_bfloat16": 2, "char": 1, "int8_t": 1, "uint8_t": 1}
    expression = re.sub(r"sizeof\(\s*([\w:]+)\s*\)", lambda m: str(sizes.get(m.group(1), "X")), match.group(1))
    if not re.fullmatch(r"[\d\s+*/()-]+", expression):
        return None
    return int(eval(expression))  # noqa: S307 - digits and operators only (checked above)


def cuda_rows(classes: list[int], timeout: float) -> tuple[list[dict], list[str]]:
    """One row per CUDA kernel instantiation of csrc/cuda/fused_loss.cu compiled for sm_90
    (``classes`` is unused: no CUDA kernel's shared memory depends on C)."""
    notes = []
    nvcc = None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            nvcc = os.path.join(home, "bin", "nvcc")
    nvcc = nvcc or shutil.which("nvcc")
    source_path = os.path.join(ROOT, "csrc", "cuda", "fused_loss.cu")
    if nvcc is None:
        return [], ["CUDA: nvcc not found (CUDA_HOME, CUDA_PATH, PATH): no CUDA rows"]
    with open(source_path) as handle:
        source = handle.read()
    # Constants may live in the headers beside it (csrc/cuda/*.h, csrc/*.h).
    headers = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.h")) + glob.glob(os.path.join(ROOT, "csrc", "*.h")))
    for header in headers:
        with open(header) as handle:
            source += "\n" + handle.read()
    with tempfile.TemporaryDirectory(prefix="kdfast_gpu_static_nvcc_") as folder:
        obj = os.path.join(folder, "fused_loss.o")
        command = [nvcc, "-c", os.path.relpath(source_path, ROOT), "-o", obj, "-O3", "-std=c++17", "-Xcompiler",
                   "-fPIC", f"-I{os.path.join(ROOT, 'csrc')}", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v"]
        begin = time.perf_counter()
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return [], [f"CUDA: nvcc did not finish within {timeout:.0f} s"]
        compile_s = time.perf_counter() - begin
        if run.returncode != 0:
            return [], [f"CUDA: nvcc failed (exit {run.returncode}): {run.stderr.strip()[-1500:]}"]
        functions = parse_ptxas_log(run.stdout + run.stderr)
        cuobjdump = _triton_tool("cuobjdump")
        elf = subprocess.run([cuobjdump, "-elf", obj], capture_output=True, text=True).stdout if cuobjdump else ""
        sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True).stdout if cuobjdump else ""
    launch_bounds = {}
    for section in re.split(r"\n(?=\.nv\.info\.)", elf):
        header = re.match(r"\.nv\.info\.(\S+)", section)
        bound = re.search(r"EIATTR_MAX_THREADS\s*\n\s*Format:\s*\S+\s*\n\s*Value:\s*(0x[0-9a-f]+|\d+)", section)
        if header and bound:
            launch_bounds[header.group(1)] = int(bound.group(1), 0)
    sass_by_function = {}
    for chunk in re.split(r"\n\s*Function : ", "\n" + sass)[1:]:
        name, _, body = chunk.partition("\n")
        sass_by_function[name.strip()] = body
    k_threads = _cuda_constant(source, "kThreads")
    block_sort_max = _cuda_constant(source, "kSpearmanBlockSortMax")
    if not launch_bounds:
        notes.append(f"CUDA: no EIATTR_MAX_THREADS in the cubin; threads per block = kThreads = {k_threads}")
    names = _demangle(list(functions))
    rows = []
    for mangled, info in functions.items():
        short, is_cub = _short_cuda_name(names[mangled])
        threads = launch_bounds.get(mangled) or (None if is_cub else k_threads)
        types = re.findall(r"\b(__nv_bfloat16|__half|float|double)\b", short.split("<", 1)[1]) \
            if "<" in short and not is_cub else []
        dtype = "/".join(dict.fromkeys(_CUDA_TYPES[t] for t in types)) if types else ""
        loads, stores = sass_global_accesses(sass_by_function.get(mangled, ""))
        base = {
            "backend": "cuda", "kernel": ("CUB: " if is_cub else "") + short,
            "launcher": "cub::DeviceSegmentedRadixSort::SortPairs (Spearman row sorts, C > kSpearmanBlockSortMax)"
            if is_cub
            else "kdfast::cuda::fused_loss",
            "dtype": dtype, "config": f"__launch_bounds__({threads})" if threads else "",
            "specialization": "nvcc -O3 -gencode=arch=compute_90,code=sm_90",
            "num_warps": threads // WARP_SIZE if threads else "", "threads": threads or "",
            "registers": info.get("registers"), "spill_bytes": info.get("spill_stores", 0) + info.get("spill_loads", 0),
            "global_loads": loads, "global_stores": stores, "compile_s": round(compile_s, 2),
            "ptxas_s": round(info.get("ptxas_s", 0.0), 3), "status": "ok",
        }
        limit = block_sort_max if block_sort_max is not None else "kSpearmanBlockSortMax"
        # CUB's segmented sorts serve only the rows too long for the in-block sorts.
        variants = [(f">{limit}" if is_cub else "any", 0, "")]
        layout = re.match(r"fused_row_kernel<(\d+),(\d+),", short)
        if layout:
            # The row kernel's layouts (launch_row_kernel): the classes each serves, and the
            # passes over each input counted from the source (resident: the row is read into
            # registers once; chunked: the online maxima, sums, KL, entropy and row Pearson
            # statistics — or, with the column term, the direct pass over the known p, q —
            # then the gradient).
            group, vectors = int(layout.group(1)), int(layout.group(2))
            served = {(32, 1): "1-256", (32, 2): "257-512", (256, 1): "513-2048", (256, 0): ">2048"}
            lanes = {(32, 1): "8, 16 or 32 lanes per row", (32, 2): "a warp per row, 2 runs per lane",
                     (256, 1): "a block per row, resident", (256, 0): "a block per row, chunked"}
            variants = [(served.get((group, vectors), "?"), 0, lanes.get((group, vectors), ""))]
            base["input_passes"] = ("s 1, t 1 (source)" if vectors else
                                    "s 2, t 2 (source; every loss)")
        static = info.get("smem", 0)
        # The Spearman kernels (launch_spearman_rows / launch_spearman_long_rows): rows of up
        # to kSpearmanBlockSortMax classes sorted in shared memory by a block of the bucket's
        # threads (plan_spearman), PAV one thread per row, then the finish kernel; longer rows
        # after CUB's segmented sorts. Static shared memory only.
        spearman = re.match(r"spearman_(teacher|student|finish)_kernel<[^,]+,(\d+),(\d+)>", short)
        if spearman:
            role, block, items = spearman.group(1), int(spearman.group(2)), int(spearman.group(3))
            first = block // 2 * items + 1 if block > 128 else 1
            roles = {"teacher": "the teacher's average ranks (cub::BlockRadixSort in shared memory)",
                     "student": "the student's descending sort, theta column-major (cub::BlockRadixSort)",
                     "finish": "soft ranks, rho_S and its gradient"}
            variants = [(f"{first}-{block * items}", 0, f"one block per row, {block} x {items} logits; {roles[role]}")]
        elif short.startswith("spearman_pav_kernel"):
            variants = [(f"1-{limit}", 0, "pool-adjacent-violators, one thread per row, 32 rows per block")]
        elif short.startswith("spearman_kernel"):
            variants = [(f">{limit}", 0, "one block per row after CUB's segmented sorts; rank rows in the workspace, "
                                         "PAV by one thread")]
        for c, dynamic, note in variants:
            shared = static + dynamic
            row = {**base, "classes": c, "shared_bytes": shared,
                   "note": "; ".join(filter(None, [note, "compile_s: whole-file nvcc time (all instantiations)"]))}
            if threads and info.get("registers") is not None:
                row.update(occupancy(info["registers"], shared, threads))
            rows.append(row)
    rows.sort(key=lambda r: (r["kernel"].startswith("CUB"), r["kernel"],
                             int(r["classes"]) if str(r["classes"]).isdigit() else -1))
    notes.append(f"CUDA: {len(functions)} kernels from one nvcc run of {compile_s:.1f} s "
                 f"({os.path.relpath(source_path, ROOT)}, sm_90)")
    return rows, notes


# ---------------------------------------------------------------------------------------
# The table.

COLUMNS = ["backend", "kernel", "launcher", "classes", "dtype", "config", "specialization", "num_warps", "threads",
           "registers", "spill_bytes", "shared_bytes", "blocks_per_sm", "warps_per_sm", "occupancy_limit",
           "global_loads", "global_stores", "input_passes", "vector_bytes", "bytes_per_row", "floor_bytes_per_row",
           "floor_ratio", "ptx_check", "compile_s", "ptxas_s", "stages_s", "status", "note", "commit", "date"]


BYTES_MODEL_COLUMNS = ("input_passes", "vector_bytes", "bytes_per_row", "floor_bytes_per_row", "floor_ratio",
                       "ptx_check")


def _config_text(constexprs: dict) -> str:
    """Constexprs compactly: ``NAME=value`` for non-booleans, ``NAME`` for True; False omitted."""
    parts = []
    for name, value in constexprs.items():
        if value is True:
            parts.append(name)
        elif value is False:
            continue
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts)


def triton_rows(captured: dict, specs: list[dict], results: dict[str, dict]) -> list[dict]:
    """One row per (compiled configuration, C, dtype)."""
    groups: dict[tuple, dict] = {}
    for launch, spec in zip(captured["launches"], specs):
        group = groups.setdefault((spec["key"], launch["classes"], launch["dtype"]),
                                  {"launch": launch, "spec": spec, "scenarios": []})
        if launch["scenario"] not in group["scenarios"]:
            group["scenarios"].append(launch["scenario"])
    rows = []
    for (key, classes, dtype), group in groups.items():
        spec, result = group["spec"], results.get(key, {})
        if "error" in spec:
            result = {"status": f"error (specialization): {spec['error']}"}
        spec_parts = [spec.get("method", "")]
        if spec.get("div16_ints"):
            spec_parts.append("div16 ints: " + ",".join(spec["div16_ints"]))
        if spec.get("unaligned_pointers"):
            spec_parts.append("unaligned pointers: " + ",".join(spec["unaligned_pointers"]))
        warps = result.get("num_warps") or spec.get("num_warps")
        threads = warps * WARP_SIZE * (result.get("num_ctas") or 1) if warps else None
        shared = None
        if result.get("status") == "ok":
            shared = (result.get("dynamic_shared") or 0) + (result.get("static_shared") or 0)
        spills = None
        if result.get("spill_stores") is not None:
            spills = result["spill_stores"] + result["spill_loads"]
        notes = []
        if result.get("cuobjdump_registers") is not None and result.get("registers") is not None \
                and result["cuobjdump_registers"] != result["registers"]:
            notes.append(f"cuobjdump says {result['cuobjdump_registers']} registers")
        if result.get("stack"):
            notes.append(f"stack frame {result['stack']} B")
        if result.get("target_arch"):
            notes.append(f"ptx target {result['target_arch']}")
        notes.append(f"B={captured['batch']} grid={group['launch']['grid']}")
        row = {
            "backend": "triton", "kernel": group["launch"]["kernel"], "launcher": "+".join(group["scenarios"]),
            "classes": classes, "dtype": dtype, "config": _config_text(spec.get("constexprs", {})),
            "specialization": "; ".join(filter(None, spec_parts)), "num_warps": warps or "",
            "threads": threads or "", "registers": result.get("registers"), "spill_bytes": spills,
            "shared_bytes": shared, "global_loads": result.get("global_loads", ""),
            "global_stores": result.get("global_stores", ""),
            **{key: result.get("bytes_model", {}).get(key, "") for key in BYTES_MODEL_COLUMNS},
            "compile_s": round(result["compile_s"], 2) if result.get("compile_s") is not None else "",
            "ptxas_s": round(result["ptxas_s"], 3) if result.get("ptxas_s") is not None else "",
            "stages_s": " ".join(f"{k}={v:.2f}" for k, v in result.get("stages", {}).items()),
            "status": result.get("status", "not compiled"), "note": "; ".join(notes),
        }
        if threads and row["registers"] is not None and shared is not None:
            row.update(occupancy(row["registers"], shared, threads))
        rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], r["classes"], r["dtype"], r["launcher"]))
    return rows


def misses_target(row: dict) -> list[str]:
    """Why a row at C = 1000 bf16 misses the target (compile <= 5 s, zero spills)."""
    reasons = []
    if row.get("status") != "ok":
        reasons.append(row.get("status", "not compiled"))
    if isinstance(row.get("spill_bytes"), int) and row["spill_bytes"] > 0:
        reasons.append(f"{row['spill_bytes']} B spilled")
    seconds = row.get("compile_s") if row["backend"] == "triton" else row.get("ptxas_s")
    if isinstance(seconds, (int, float)) and seconds > TARGET_COMPILE_S:
        reasons.append(f"compile {seconds:.1f} s")
    return reasons


def serves(classes: str, width: int) -> bool:
    """Whether a row's ``classes`` ("any", "1000", "513-2048", ">8192") include ``width``."""
    classes = str(classes)
    if classes == "any":
        return True
    if classes.startswith(">"):
        return width > int(classes[1:])
    low, _, high = classes.partition("-")
    return int(low) <= width <= int(high or low)


def in_target_scope(row: dict) -> bool:
    if row["backend"] == "triton":
        return row["classes"] == TARGET_CLASSES and row["dtype"] == TARGET_DTYPE
    # CUDA: the bf16 instantiations and the dtype-free ones (finalize, CUB's) that serve C = 1000.
    return row["dtype"] in (TARGET_DTYPE, "") and serves(row["classes"], int(TARGET_CLASSES))


def _span(values) -> str:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def _flagged(row: dict) -> list[str]:
    """Why a row deserves attention anywhere (spills, compile > 5 s, not compiled)."""
    reasons = []
    if row.get("status") != "ok":
        reasons.append(str(row.get("status")))
    if isinstance(row.get("spill_bytes"), int) and row["spill_bytes"] > 0:
        reasons.append(f"{row['spill_bytes']} B spilled")
    if row["backend"] == "triton" and isinstance(row.get("compile_s"), (int, float)) and row["compile_s"] > 5:
        reasons.append(f"compile {row['compile_s']:.1f} s")
    return reasons


def print_summary(rows: list[dict], notes: list[str], elapsed: float) -> None:
    """Per kernel, C and dtype (CUDA: per kernel over its template instantiations): ranges
    over the configurations; then the flagged rows and the target's misses."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["backend"] == "triton":
            key = ("triton", row["kernel"], row["classes"], row["dtype"])
        else:
            key = ("cuda", row["kernel"].split("<")[0], row["classes"], "all" if row["dtype"] else "-")
        groups.setdefault(key, []).append(row)
    header = (f"{'backend':7} {'kernel':38} {'C':>6} {'dtype':5} {'n':>2} {'warps':>5} {'regs':>7} {'spill':>9} "
              f"{'smem':>11} {'warps/SM':>8} {'limit':24} {'compile_s':>9}")
    print(header)
    print("-" * len(header))
    for (backend, kernel, classes, dtype), members in groups.items():
        seconds = [m["compile_s"] if backend == "triton" else m["ptxas_s"] for m in members]
        limits = "/".join(sorted({str(m.get("occupancy_limit") or "-") for m in members}))
        flag = " *" if any(_flagged(m) for m in members) else ""
        print(f"{backend:7} {kernel[:38]:38} {classes!s:>6} {dtype:5} {len(members):>2} "
              f"{_span([m['num_warps'] for m in members]):>5} {_span([m['registers'] for m in members]):>7} "
              f"{_span([m['spill_bytes'] for m in members]):>9} {_span([m['shared_bytes'] for m in members]):>11} "
              f"{_span([m.get('warps_per_sm') for m in members]):>8} {limits[:24]:24} "
              f"{_span([round(s, 2) for s in seconds if isinstance(s, (int, float))]):>9}{flag}")
    print("(n: configurations or instantiations; ranges min-max over them; compile_s of CUDA rows: ptxas's own "
          "seconds per kernel, the whole file's nvcc time is in the CSV; * flagged below)")
    flagged = [(row, _flagged(row)) for row in rows if _flagged(row)]
    if flagged:
        print("\nflagged (spills, compile > 5 s, or not compiled):")
        for row, reasons in flagged:
            print(f"  {row['backend']} {row['kernel']} C={row['classes']} {row['dtype']} [{row['config']}] "
                  f"({row['launcher']}): {'; '.join(reasons)}")
    print()
    for note in notes:
        print("note:", note)
    print()
    scoped = [r for r in rows if in_target_scope(r)]
    missing = [(r, misses_target(r)) for r in scoped if misses_target(r)]
    print(f"Target (sm_90, C={TARGET_CLASSES}, {TARGET_DTYPE}: compile <= {TARGET_COMPILE_S:.0f} s, zero spills): "
          f"{len(scoped) - len(missing)} of {len(scoped)} configurations meet it.")
    for row, reasons in missing:
        print(f"  MISS {row['backend']} {row['kernel']} [{row['config']}] ({row['launcher']}): {'; '.join(reasons)}")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"\nhost: {os.cpu_count()} CPUs, load average {load} (1/5/15 min) at the end; total {elapsed:.0f} s")


def write_table(path: str, rows: list[dict]) -> None:
    """The whole file, fresh: this commit's table (commit and date on every row)."""
    import common

    stamp = {"commit": common.commit(), "date": datetime.date.today().isoformat()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**{c: "" for c in COLUMNS}, **{k: ("" if v is None else v) for k, v in row.items()},
                             **stamp})


def check_skip(classes: int, dtypes: list[str], teacher_grad_all: bool) -> list[str]:
    """Compares the launches recorded with and without running the interpreted kernels
    (B = 2): differences, or an empty list when skipping is faithful."""
    def signature(captured):
        return [(l["scenario"], l["kernel"], l["grid"] if isinstance(l["grid"], list) else None,
                 json.dumps(l["args"], sort_keys=True), json.dumps(l["kwargs"], sort_keys=True))
                for l in captured["launches"]]

    skipped = capture_launches([classes], dtypes, batch=2, execute=False, teacher_grad_all=teacher_grad_all)
    executed = capture_launches([classes], dtypes, batch=2, execute=True, teacher_grad_all=teacher_grad_all)
    a, b = signature(skipped), signature(executed)
    if a == b:
        return []
    return [f"skipped: {x}\nexecuted: {y}" for x, y in zip(a, b) if x != y][:5] or \
        [f"{len(a)} launches skipped vs {len(b)} executed"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 8192, 131072])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--output", default=os.path.join(HERE, "results", "gpu_static.csv"))
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels (csrc/cuda)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--batch", type=int, default=64,
                        help="rows B of the captured launches (only ints derived from B, e.g. the column kernels' "
                             "row count, and grids depend on it; 64 is divisible by 16 like common batch sizes)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="compiles at a time (default 1: compile times are part of the evidence, and two "
                             "compiles at once on 2 CPUs took up to 3x longer each; a full default run with 1 "
                             "takes a few minutes)")
    parser.add_argument("--compile-timeout", type=float, default=300, help="seconds per Triton compile")
    parser.add_argument("--execute", action="store_true",
                        help="run the interpreted kernels during the capture instead of skipping them (slow)")
    parser.add_argument("--check-skip", action="store_true",
                        help="first compare captures with and without running the kernels at the smallest C")
    parser.add_argument("--teacher-grad-all", action="store_true",
                        help="capture every loss also with the teacher requiring grad (default: kd and cmkd)")
    parser.add_argument("--_capture", help=argparse.SUPPRESS)
    parser.add_argument("--_specialize", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_compile-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._capture:
        captured = _capture_in_process(args.classes, args.dtypes, args.batch, args.execute, args.teacher_grad_all)
        with open(args._capture, "w") as handle:
            json.dump(captured, handle)
        return 0
    if args._specialize:
        _specialize_main(*args._specialize)
        return 0
    if args._compile_worker:
        _worker_main()
        return 0

    begin = time.perf_counter()
    rows, notes = [], []
    # One thing at a time beside the compile workers: nvcc next to them would slow both
    # (compile times are part of the evidence).
    if not args.no_cuda:
        print("compiling csrc/cuda/fused_loss.cu for sm_90 ...", flush=True)
        cuda, cuda_notes = cuda_rows(args.classes, 1800)
        rows += cuda
        notes += cuda_notes
    if not args.no_triton:
        if args.check_skip:
            differences = check_skip(min(args.classes), args.dtypes, args.teacher_grad_all)
            notes.append("skip check: launches identical with and without running the interpreted kernels "
                         f"(C={min(args.classes)}, B=2)" if not differences else
                         "skip check FAILED:\n" + "\n".join(differences))
        print("capturing the Triton launches under the interpreter ...", flush=True)
        captured = capture_launches(args.classes, args.dtypes, args.batch, args.execute, args.teacher_grad_all)
        notes += captured["notes"]
        if captured["unlaunched"]:
            notes.append("Triton JIT functions never launched (device functions, or kernels no op reached): "
                         + ", ".join(captured["unlaunched"]))
        specs = specialize_launches(captured["launches"])
        unique = {}
        for launch, spec in zip(captured["launches"], specs):
            if "error" not in spec:
                unique.setdefault(spec["key"], launch)
        notes.append(f"Triton: {len(captured['launches'])} launches captured, {len(unique)} distinct compiled "
                     f"kernels (B={args.batch}, launches {'run' if args.execute else 'skipped'} under the "
                     "interpreter)")
        print(f"compiling {len(unique)} Triton kernel configurations for sm_90, {args.jobs} at a time ...",
              flush=True)
        results = compile_all(unique, args.jobs, args.compile_timeout,
                              progress=lambda line: print(line, flush=True))
        rows = triton_rows(captured, specs, results) + rows
    write_table(args.output, rows)
    print()
    print_summary(rows, notes, time.perf_counter() - begin)
    print(f"wrote {os.path.relpath(args.output)} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
