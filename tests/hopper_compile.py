"""Compile Triton kernels for a Hopper GPU (sm_90) without a GPU; print what ptxas reports.

    python tests/hopper_compile.py < spec.json

Run in a process *without* ``TRITON_INTERPRET`` (the interpreter replaces compilation):
:func:`helpers.compile_for_hopper` starts it so. The spec is a JSON list of kernels, each

    {"label": "kd", "kernel": "kd_losses._fused_row_kernel", "constexprs": {...}, "warps": 8,
     "types": {"s_ptr": "*bf16", ...}, "integers": ["C", "B"], "divisibility": true, "ir": false}

An argument's type is, in order: ``constexpr`` when it is in ``constexprs``; ``types[arg]``;
``*fp32`` for any other ``*_ptr``; ``i32`` when it is in ``integers``; else ``fp32``.
``divisibility`` marks every pointer 16-byte aligned (as Triton's launcher specializes
PyTorch's allocations). The last line printed is a JSON object: per label, the registers
and spill bytes (stores + loads) from ptxas's log (None when Triton does not print it),
the cubin's size, and with ``ir`` the TTGIR.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)


def signature_of(kernel, constexprs: dict, types: dict, integers) -> dict:
    signature = {}
    for arg in inspect.signature(kernel.fn).parameters:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in types:
            signature[arg] = types[arg]
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32"
        else:
            signature[arg] = "i32" if arg in integers else "fp32"
    return signature


def compile_one(entry: dict) -> dict:
    module_name, _, kernel_name = entry["kernel"].rpartition(".")
    kernel = getattr(importlib.import_module(f"kdfast.kernels.{module_name}"), kernel_name)
    constexprs = entry.get("constexprs", {})
    signature = signature_of(kernel, constexprs, entry.get("types", {}), entry.get("integers", ()))
    attrs = ({(i,): [["tt.divisibility", 16]] for i, arg in enumerate(signature) if arg.endswith("_ptr")}
             if entry.get("divisibility", True) else None)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=HOPPER, options={"num_warps": entry.get("warps", 4)})
    used = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    report = {"registers": int(used.group(1)) if used else None,
              "spills": int(spills.group(1)) + int(spills.group(2)) if spills else None,
              "cubin_bytes": len(compiled.asm["cubin"])}
    if entry.get("ir"):
        report["ttgir"] = compiled.asm["ttgir"]
    return report


def main() -> None:
    from triton import knobs

    with contextlib.suppress(AttributeError):
        knobs.nvidia.dump_ptxas_log = True
    spec = json.load(sys.stdin)
    print(json.dumps({entry["label"]: compile_one(entry) for entry in spec}))


if __name__ == "__main__":
    main()
