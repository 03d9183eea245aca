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
    assert {"_fused_row_kernel", "_softmax_stats_kernel", "_column_moments_kernel", "_spearman_kernel",
            "_gate_compact_kernel"} <= found

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
