"""benchmarks/gpu_static.py: the sm_90 occupancy arithmetic, and the capture of the Triton
launches (under the interpreter) with their sm_90 specialization; no compilation (slow)."""

import importlib.util
import os

import pytest

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_static.py")


@pytest.fixture(scope="module")
def gpu_static():
    spec = importlib.util.spec_from_file_location("gpu_static", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("registers, shared, threads, blocks, warps, limit", [
    (255, 0, 256, 1, 8, "registers"),  # 256 regs/thread x 256 threads = the whole register file
    (32, 0, 256, 8, 64, "registers+threads"),
    (64, 0, 256, 4, 32, "registers"),
    (168, 0, 128, 3, 12, "registers"),  # 5376 regs/warp -> 12 warps (a multiple of 4)
    (32, 100 * 1024, 256, 2, 16, "shared"),  # 101 KB per block (1 KB reserved) -> 2 in 228 KB
    (16, 0, 32, 32, 32, "blocks"),
    (32, 228 * 1024, 256, 0, 0, "none fit (shared)"),
    (256, 0, 256, 0, 0, "none fit (registers)"),
])
def test_occupancy_sm90(gpu_static, registers, shared, threads, blocks, warps, limit):
    result = gpu_static.occupancy(registers, shared, threads)
    assert (result["blocks_per_sm"], result["warps_per_sm"], result["occupancy_limit"]) == (blocks, warps, limit)


def test_global_access_counts(gpu_static):
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p2 ld.global.L1::evict_last.b16 { %rs1 }, [ %rd2 + 0 ];
    ld.global.b16 {%rs2}, [%rd3];
    @%p3 st.global.v2.b32 [ %rd4 + 0 ], { %r5, %r6 };
    """
    assert gpu_static.ptx_global_accesses(ptx) == ("ld.b16:2, ld.v4.b32:1", "st.v2.b32:1")
    sass = ("LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;\n@P0 LDG.E.U16 R5, desc[UR4][R6.64] ;\n"
            "STG.E desc[UR4][R2.64], R0 ;\nBAR.RED.AND.DEFER_BLOCKING 0x0, P0 ;")  # a barrier, not memory
    assert gpu_static.sass_global_accesses(sass) == ("LDG.128:1, LDG.U16:1", "STG.32:1")


def test_capture_finds_every_kernel_with_typed_signatures(gpu_static):
    captured = gpu_static.capture_launches([100], ["bf16"], batch=16, execute=False, timeout=300)
    launches = captured["launches"]
    by_scenario = {}
    for launch in launches:
        by_scenario.setdefault(launch["scenario"], set()).add(launch["kernel"])
    for name, _, _, _ in gpu_static._scenarios(teacher_grad_all=False):
        assert by_scenario.get(name), f"{name} launched no Triton kernel: {captured['notes']}"
    assert "_fused_row_kernel" in by_scenario["kd_loss"]
    assert by_scenario["pearson_loss(dim=0)"] - {"_fused_row_kernel"}, "the column term launches its own kernels"
    found = set().union(*by_scenario.values())
    assert {"_fused_row_kernel", "_column_partials_kernel", "_spearman_prepare_kernel",
            "_pav_kernel", "_spearman_finish_kernel", "_gate_confidence_kernel", "_gate_compact_kernel"} <= found

    specs = gpu_static.specialize_launches(launches, timeout=300)
    assert len(specs) == len(launches)
    for launch, spec in zip(launches, specs):
        assert "error" not in spec, spec
        assert spec["method"] == "triton binder", spec["method"]  # Triton's own specialization, not the fallback
        assert isinstance(spec["num_warps"], int) and spec["num_warps"] >= 1
        names = list(spec["signature"])
        for name, arg in zip(names, launch["args"]):
            if arg["kind"] == "tensor":
                assert spec["signature"][name].startswith("*") and len(spec["signature"][name]) > 1, (name, spec)
        assert not spec["untyped"], spec
    # Launches of one configuration merge: kd_loss's row kernel is one compile per (C, dtype).
    keys = {spec["key"] for spec in specs}
    assert len(keys) < len(launches)


# ------------------------------------------------- the bytes-moved model (bytes_model.py)

BYTES_MODEL = r"""
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, "benchmarks")
import bytes_model
from kdfast.kernels import kd_losses

kernel = kd_losses._fused_row_kernel
results = {}
for classes, teacher_grad in ((1000, False), (1000, True), (131072, False)):
    layout = kd_losses.launch_config(classes)
    flags = dict(C=classes, HAS_TARGET=False, HAS_KL=True, HAS_CE=False, HAS_PEARSON=False, HAS_SPEARMAN=False,
                 HAS_COLUMN=False, RECTIFY=False, DIFFICULTY_MODE=0, STUDENT_GRAD=True, TEACHER_GRAD=teacher_grad,
                 ROWS=layout.rows, BLOCK=layout.block, RESIDENT=layout.resident)
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in flags else ("*bf16" if n in ("s_ptr", "t_ptr", "gs_ptr", "gt_ptr") else
                 "*i64" if n == "target_ptr" else "*fp64" if n == "rho_s_ptr" else "*fp32" if n.endswith("_ptr")
                 else "i32" if n == "B" else "fp32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr")}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=flags, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": layout.warps})
    results[f"{classes}-{teacher_grad}"] = bytes_model.row_kernel_model(
        flags, 2, layout.warps * 32, compiled.asm["ttgir"], compiled.asm["ptx"], names)
print(json.dumps(results))
"""


def test_bytes_model_of_the_row_kernel_reads_the_compiled_kernel():
    # kd_loss in bf16: at C = 1000 (resident) each input is read once with 16-byte vectors;
    # at C = 131072 (chunked) twice; the PTX's bytes per thread agree with the structure.
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(PATH))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", BYTES_MODEL], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    resident, teacher, chunked = results["1000-False"], results["1000-True"], results["131072-False"]
    assert resident["input_passes"] == "s 1, t 1" and resident["floor_ratio"] == 1.0
    assert resident["vector_bytes"] == "s 16 B, t 16 B, gs 16 B" and resident["ptx_check"] == "agrees"
    assert teacher["gradient_writes"] == 2 and teacher["floor_ratio"] == 1.0 and teacher["ptx_check"] == "agrees"
    assert chunked["input_passes"] == "s 2, t 2" and chunked["ptx_check"] == "agrees"
    assert chunked["floor_ratio"] == round(5 / 3, 2)


def test_bytes_model_traces_pointers_through_the_ir():
    import sys

    sys.path.insert(0, os.path.dirname(PATH))
    import bytes_model

    ttgir = """
  tt.func public @k(%s_ptr: !tt.ptr<bf16> loc("s_ptr"(#loc)), %g_ptr: !tt.ptr<bf16> loc("g_ptr"(#loc))) attributes {noinline = false} {
    %a = tt.splat %s_ptr : !tt.ptr<bf16> -> tensor<2x64x!tt.ptr<bf16>, #blocked> loc(#loc1)
    %b = tt.addptr %a, %off : tensor<2x64x!tt.ptr<bf16>, #blocked>, tensor<2x64xi64, #blocked> loc(#loc2)
    %x = tt.load %b, %mask : tensor<2x64x!tt.ptr<bf16>, #blocked> loc(#loc3)
    scf.for %i = %c0 to %c4 step %c1 {
      %a = tt.splat %g_ptr : !tt.ptr<bf16> -> tensor<2x64x!tt.ptr<bf16>, #blocked> loc(#loc4)
      %y = tt.load %a, %mask : tensor<2x64x!tt.ptr<bf16>, #blocked> loc(#loc5)
      %r = tt.splat %s_ptr : !tt.ptr<bf16> -> tensor<2x!tt.ptr<bf16>, #slice> loc(#loc6)
      %z = tt.load %r, %row_mask : tensor<2x!tt.ptr<bf16>, #slice> loc(#loc7)
    }
"""
    accesses = bytes_model.ttgir_accesses(ttgir)
    assert accesses["s_ptr"]["tile_loads"] == 1 and accesses["s_ptr"]["row_loads"] == 1
    assert accesses["g_ptr"]["tile_loads"] == 1 and accesses["s_ptr"]["tile"] == [2, 64]
    ptx = """
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	mad.wide.s32 	%rd3, %r1, 2, %rd1;
	add.s64 	%rd4, %rd3, 16;
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
	ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
	add.s64 	%rd5, %rd2, %rd6;
	@%p1 st.global.v2.b32 [ %rd5 + 0 ], { %r6, %r7 };
"""
    by_param = bytes_model.ptx_param_bytes(ptx)
    assert by_param[0] == {"load_bytes": 18, "store_bytes": 0, "widest_load": 16, "widest_store": 0}
    assert by_param[1]["store_bytes"] == 8


def test_readme_gpu_tables_are_generated_from_the_committed_csv():
    # The README's static tables are written by benchmarks/readme_tables.py from
    # gpu_static.csv; a CSV regenerated without rewriting them (or a hand edit) fails here.
    spec = importlib.util.spec_from_file_location(
        "readme_tables", os.path.join(os.path.dirname(PATH), "readme_tables.py"))
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    assert tables.main(["--check"]) == 0


@pytest.mark.parametrize("classes, width, expected", [
    ("any", 1000, True), ("1000", 1000, True), ("100", 1000, False), ("513-2048", 1000, True),
    ("1-256", 1000, False), (">8192", 1000, False), (">8192", 8193, True), ("4097-8192", 8192, True),
])
def test_the_classes_a_cuda_kernel_serves(gpu_static, classes, width, expected):
    assert gpu_static.serves(classes, width) is expected
