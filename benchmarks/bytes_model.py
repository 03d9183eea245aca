"""Bytes moved by kdfast's GPU row kernels, read from their structure and checked against
their PTX (static evidence: no GPU needed, no timing).

The floor of a fused loss is the bytes it must move: read the student and the teacher
logits once, write each gradient asked for once. A kernel moves more when it reads a row
again (a *pass*): the Triton row kernel's resident layout reads each input once; its
chunked layout once per loop over the chunks of a row.

* ``ttgir_accesses``: every ``tt.load`` / ``tt.store`` of a compiled Triton kernel (its
  TTGIR), attributed to the kernel argument its pointer comes from (through ``tt.splat``,
  ``tt.addptr``, ``tt.broadcast``, ...) and classified by shape: a *tile* (2-D: rows ×
  columns, one pass over those rows' columns, in a loop over chunks or whole) or a
  *per-row* value (1-D, one element a row: a target, a logit at the target).
* ``ptx_param_bytes``: the PTX's global loads and stores per kernel parameter, in bytes
  per thread per executed instruction (``ld.global.v4.b32`` is 16 B), traced through the
  PTX's register definitions to the ``ld.param.b64`` of a pointer parameter. The check:
  the PTX's bytes per thread on each input equal passes × (tile bytes / threads) + per-row
  loads × element size (up to ROWS elements each, where the layout replicates them), i.e. the PTX moves what the TTGIR's structure says, with the
  vector width the PTX shows (``vector_bytes``).
* ``row_kernel_model``: per row of C logits, the HBM bytes of the Triton row kernel
  (passes × C × element size per input, the gradients written, the Spearman gradient read
  in fp32 when present) against the floor. An *estimate*: every pass after the first is
  counted as an HBM read, though L2 (50 MB on an H100/H200) may serve part of it; column
  statistics (20 KB at C = 1000) are read from L2 and not counted; per-row scalars are
  ignored (≤ 32 B a row).
"""

from __future__ import annotations

import re
from collections import defaultdict

_TTGIR_FUNC = re.compile(r"tt\.func\s+public\s+@\w+\((.*?)\)\s*attributes", re.S)
_TTGIR_ARG = re.compile(r"%(\w+):\s*!tt\.ptr<")
_TTGIR_DEF = re.compile(r"^\s*(%[\w#]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_TTGIR_ACCESS = re.compile(r"^\s*(?:(%[\w#]+)\s*=\s*)?tt\.(load|store)\s+(%[\w#]+)[^:]*:\s*tensor<([\dx]+)x!tt\.ptr<(\w+)>")
_SSA = re.compile(r"%[\w#]+")
# Ops whose pointer result derives from their first operand.
_POINTER_OPS = ("tt.splat", "tt.addptr", "tt.broadcast", "tt.expand_dims", "ttg.convert_layout", "tt.reshape",
                "tt.trans", "arith.select")

_ELEMENT_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "i1": 1}


def ttgir_accesses(ttgir: str) -> dict[str, dict]:
    """argument name -> {"tile_loads", "row_loads", "tile_stores", "row_stores": counts of
    static sites, "tile": the tile shape seen, "element_bytes"} for the kernel's pointer
    arguments; "?" collects the accesses whose pointer could not be traced."""
    header = _TTGIR_FUNC.search(ttgir)
    arguments = set(_TTGIR_ARG.findall(header.group(1))) if header else set()
    # SSA names repeat across regions (each loop body has its own %s_70): a use refers to
    # the nearest definition above it.
    defs: dict[str, list[tuple[int, str, list[str]]]] = defaultdict(list)
    lines = ttgir.splitlines()
    for number, line in enumerate(lines):
        if m := _TTGIR_DEF.match(line):
            name, op, rest = m.groups()
            defs[name].append((number, op, _SSA.findall(rest.split(" loc(")[0])))

    def origin(value: str, before: int, depth: int = 0) -> str:
        if value[1:] in arguments:
            return value[1:]
        above = [d for d in defs.get(value, []) if d[0] < before]
        if depth > 64 or not above:
            return "?"
        number, op, operands = above[-1]
        if op in _POINTER_OPS and operands:
            candidates = operands[1:] if op == "arith.select" else operands[:1]
            for operand in candidates:
                found = origin(operand, number, depth + 1)
                if found != "?":
                    return found
        return "?"

    table: dict[str, dict] = defaultdict(lambda: {"tile_loads": 0, "row_loads": 0, "tile_stores": 0,
                                                  "row_stores": 0, "tile": None, "element_bytes": None})
    for number, line in enumerate(lines):
        m = _TTGIR_ACCESS.match(line)
        if not m:
            continue
        _, kind, pointer, shape, element = m.groups()
        dims = [int(d) for d in shape.split("x") if d]
        entry = table[origin(pointer, number)]
        entry["element_bytes"] = _ELEMENT_BYTES.get(element)
        kind_name = ("tile_" if len(dims) >= 2 else "row_") + ("loads" if kind == "load" else "stores")
        entry[kind_name] += 1
        if len(dims) >= 2:
            entry["tile"] = dims
    return dict(table)


_PTX_PARAM = re.compile(r"ld\.param\.b64\s+(%\w+),\s*\[(\w+)_param_(\d+)\]")
_PTX_INSTRUCTION = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+(.*?);", re.M)
_PTX_REGISTER = re.compile(r"%\w+")
_PTX_GLOBAL = re.compile(r"^(ld|st)\.global((?:\.\w+)*)$")


def _ptx_width(modifiers: str) -> int:
    parts = [p for p in modifiers.split(".") if p]
    vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bsuf]\d+", p)), 32)
    return vector * bits // 8


def ptx_param_bytes(ptx: str) -> dict[int, dict]:
    """pointer parameter index -> {"load_bytes", "store_bytes": per thread, summed over the
    static global accesses traced to it; "widest_load", "widest_store": the widest single
    access in bytes}. Index -1 collects what could not be traced."""
    params = {reg: int(index) for reg, _, index in _PTX_PARAM.findall(ptx)}
    defs: dict[str, list[list[str]]] = defaultdict(list)
    accesses = []
    for op, operands in _PTX_INSTRUCTION.findall(ptx):
        registers = _PTX_REGISTER.findall(operands)
        if m := _PTX_GLOBAL.match(op):
            address = re.search(r"\[\s*(%\w+)", operands)
            accesses.append((m.group(1), _ptx_width(m.group(2)), address.group(1) if address else None))
            if m.group(1) == "ld":  # loaded registers are defined by the load, not derived from pointers
                continue
        if registers and not op.startswith(("st.", "bra", "setp", "@")):
            destination = operands.split(",")[0].strip().strip("{} ")
            if destination.startswith("%"):
                defs[destination].append(registers[1:])

    def origin(register: str) -> int:
        seen, frontier = set(), [register]
        while frontier:
            current = frontier.pop()
            if current in params:
                return params[current]
            if current in seen:
                continue
            seen.add(current)
            for sources in defs.get(current, []):
                frontier.extend(sources)
        return -1

    table: dict[int, dict] = defaultdict(lambda: {"load_bytes": 0, "store_bytes": 0, "widest_load": 0,
                                                  "widest_store": 0})
    for kind, width, address in accesses:
        entry = table[origin(address) if address else -1]
        entry[f"{'load' if kind == 'ld' else 'store'}_bytes"] += width
        key = "widest_load" if kind == "ld" else "widest_store"
        entry[key] = max(entry[key], width)
    return dict(table)


def row_kernel_model(constexprs: dict, element_bytes: int, threads: int, ttgir: str, ptx: str,
                     arguments: list[str]) -> dict:
    """The Triton row kernel's passes over each input, its HBM bytes per row of C logits and
    their ratio to the floor, and the PTX check (see the module docstring). ``arguments``:
    the kernel's parameter names in order (the constexprs are not PTX parameters)."""
    ptx_parameters = [name for name in arguments if name not in constexprs]
    classes = constexprs["C"]
    accesses = ttgir_accesses(ttgir)
    by_index = ptx_param_bytes(ptx)
    s, t = accesses.get("s_ptr", {}), accesses.get("t_ptr", {})
    gs, gt = accesses.get("gs_ptr", {}), accesses.get("gt_ptr", {})
    passes_s, passes_t = s.get("tile_loads", 0), t.get("tile_loads", 0)
    writes = gs.get("tile_stores", 0) + gt.get("tile_stores", 0)
    written_gradients = int(bool(constexprs.get("STUDENT_GRAD"))) + int(bool(constexprs.get("TEACHER_GRAD")))
    spearman_read = 4 if constexprs.get("HAS_SPEARMAN") and constexprs.get("STUDENT_GRAD") else 0
    moved = (passes_s + passes_t + writes) * element_bytes * classes + spearman_read * classes
    floor = (2 + written_gradients) * element_bytes * classes
    checks, widths = [], []
    for name in ("s_ptr", "t_ptr", "gs_ptr", "gt_ptr"):
        entry = accesses.get(name)
        if not entry or not entry["tile"]:
            continue
        tile_elements = 1
        for d in entry["tile"]:
            tile_elements *= d
        per_thread = tile_elements * element_bytes // threads
        index = ptx_parameters.index(name)
        ptx_entry = by_index.get(index, {"load_bytes": 0, "store_bytes": 0, "widest_load": 0, "widest_store": 0})
        # A per-row value is held by one thread or, replicated, by several: at most ROWS
        # elements of it per thread.
        rows = entry["tile"][0]
        if name in ("s_ptr", "t_ptr"):
            tiles, per_row = entry["tile_loads"] * per_thread, entry["row_loads"] * element_bytes
            got, widest = ptx_entry["load_bytes"], ptx_entry["widest_load"]
        else:
            tiles, per_row = entry["tile_stores"] * per_thread, entry["row_stores"] * element_bytes
            got, widest = ptx_entry["store_bytes"], ptx_entry["widest_store"]
        widths.append(f"{name[:-4]} {widest} B")
        if not tiles + per_row <= got <= tiles + per_row * rows:
            checks.append(f"{name}: PTX {got} B/thread, structure {tiles} + {per_row}..{per_row * rows}")
    return {
        "input_passes": f"s {passes_s}, t {passes_t}",
        "gradient_writes": writes,
        "bytes_per_row": moved,
        "floor_bytes_per_row": floor,
        "floor_ratio": round(moved / floor, 2) if floor else "",
        "vector_bytes": ", ".join(widths),
        "ptx_check": "; ".join(checks) or "agrees",
    }
