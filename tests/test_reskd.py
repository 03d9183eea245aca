"""ResKD: the gate-and-compact kernels, gated inference, calibration, the reskd method and the curve."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdfast import dispatch
from kdfast.config import resolve_config
from kdfast.gate import gate_compact, gate_compact_reference, max_probability
from kdfast.reskd import ChainStage, ResidualChain, calibrate, count_flops, load_chain, simulate
from kdfast.train import train

# (backend, device): the kernels against the reference on the same device.
GATE_BACKENDS = [pytest.param(("cpu", "cpu"), id="cpu"),
                 pytest.param(("triton", "cpu"), id="triton-interpreter", marks=pytest.mark.interpreter),
                 pytest.param(("triton", "cuda"), id="triton", marks=pytest.mark.gpu)]


def quiet(*_):
    pass


def check_gate(logits, rows, threshold, backend_device):
    backend, device = backend_device
    logits, rows = logits.to(device), rows.to(device)
    expected = gate_compact_reference(logits, rows, threshold)
    got = gate_compact(logits, rows, threshold, backend=backend)
    assert torch.equal(got[0], expected[0]), (got[0], expected[0])
    assert got[1].shape == () and int(got[1]) == int(expected[1])
    torch.testing.assert_close(got[2], expected[2], rtol=1e-13, atol=0, equal_nan=True)
    return got


# ----------------------------------------------------------------------------- the kernel

@pytest.mark.parametrize("backend", GATE_BACKENDS)
@pytest.mark.parametrize("active, classes", [(0, 5), (1, 1), (1, 2), (3, 7), (37, 10), (129, 3), (64, 1000),
                                             (5, 1025), (2, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gate_agrees_with_reference(backend, active, classes, dtype):
    torch.manual_seed(active * 31 + classes)
    logits = (torch.randn(active, classes) * 4).to(dtype)
    rows = torch.randperm(10 * active + 1)[:active]
    for threshold in (0.0, 0.3, 0.9, 1.0):
        next_rows, count, confidence = check_gate(logits, rows, threshold, backend)
        kept = rows.to(confidence.device)[confidence < threshold]
        assert torch.equal(next_rows[: int(count)], kept) and (next_rows[int(count):] == -1).all()


@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_gate_edge_rows(backend):
    """Ties, a one-hot row, huge gaps (probability exactly 1), NaN and ±inf rows, non-contiguous logits."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [200.0, 0.0, -5.0, 1.0],
                           [float("nan"), 0.0, 1.0, 2.0], [float("inf"), 0.0, 1.0, 2.0],
                           [float("-inf")] * 4, [1.0, float("-inf"), 0.5, 0.2]])
    rows = torch.arange(7) * 3
    for threshold in (0.25, 0.26, 0.9999, 1.0):
        check_gate(logits, rows, threshold, backend)
    _, _, confidence = check_gate(logits, rows, 0.5, backend)
    assert confidence[0] == 0.25 and confidence[2] == 1.0
    assert torch.isnan(confidence[3:6]).all()  # and those rows stop
    wide = torch.randn(16, 40).to(backend[1])
    check_gate(wide[:, ::2], torch.arange(16), 0.5, backend)  # a stride-2 view


def test_gate_errors():
    logits, rows = torch.randn(4, 3), torch.arange(4)
    with pytest.raises(ValueError, match="threshold must be a number in"):
        gate_compact(logits, rows, 1.5)
    with pytest.raises(ValueError, match="rows must be an int64 tensor of shape"):
        gate_compact(logits, rows.int(), 0.5)
    with pytest.raises(ValueError, match="logits must be a"):
        gate_compact(torch.randn(4), rows, 0.5)
    with pytest.raises(ValueError, match="at least one class"):
        gate_compact(torch.randn(4, 0), rows, 0.5)
    with pytest.raises(dispatch.BackendUnavailableError, match="backend 'cpu' cannot run gate_compact"):
        gate_compact(logits.double(), rows, 0.5, backend="cpu")
    assert gate_compact(logits.double(), rows, 0.5)[0].shape == (4,)  # float64: the reference


def test_max_probability_formula():
    logits = torch.randn(6, 9)
    torch.testing.assert_close(max_probability(logits), torch.softmax(logits.double(), 1).max(1).values)


# ----------------------------------------------------------------------------- gated inference

def small_chain(seed=0, classes=5, stages=3):
    torch.manual_seed(seed)

    def student():
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, classes))

    return ResidualChain(student(), [student() for _ in range(stages - 1)]).eval()


@pytest.mark.parametrize("backend, device", [("torch", "cpu"), ("cpu", "cpu"),
                                             pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("batch", [1, 2, 33])
def test_infer_matches_chain_prefixes(backend, device, batch):
    """Rows that ran k stages hold exactly the k-stage prefix (up to float rounding of sub-batches)."""
    chain = small_chain().to(device)
    x = (torch.randn(batch, 3, 2, 2) * 3).to(device)
    with torch.no_grad():
        prefixes = chain.stage_logits(x)
    for thresholds in ([0.5, 0.7], [0.9, 0.3], 0.6):
        logits, stages = chain.infer(x, thresholds, backend=backend)
        assert stages.min() >= 1 and stages.max() <= 3
        for k in range(1, 4):
            rows = stages == k
            torch.testing.assert_close(logits[rows], prefixes[k - 1][rows], rtol=1e-6, atol=1e-6)
        # the gate decisions follow the definition on the prefix logits
        first = max_probability(prefixes[0])
        t0 = thresholds[0] if isinstance(thresholds, list) else thresholds
        assert torch.equal(stages == 1, first >= t0)


def test_infer_edge_thresholds():
    chain = small_chain()
    x = torch.randn(17, 3, 2, 2)
    with torch.no_grad():
        base, full = chain.base(x), chain(x)
    logits, stages = chain.infer(x, 0.0)  # everyone stops: the base alone, no res-student runs
    assert torch.equal(stages, torch.ones(17, dtype=torch.int64)) and torch.equal(logits, base)
    logits, stages = chain.infer(x, 1.0)  # nobody is certain: the full chain
    assert (stages == 3).all()
    torch.testing.assert_close(logits, full, rtol=1e-6, atol=1e-6)
    logits, stages = chain.infer(x, [1.0, 0.0])  # all run r_1, then all stop
    assert (stages == 2).all()
    with pytest.raises(ValueError, match="one entry per res-student"):
        chain.infer(x, [0.5])


def test_infer_skipped_rows_cost_nothing():
    """A res-student sees only the compacted rows: one sub-batch per stage, never the skipped ones."""
    chain = small_chain()
    seen = []
    for student in chain.res_students:
        student.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    x = torch.randn(40, 3, 2, 2) * 3
    _, stages = chain.infer(x, [0.6, 0.6])
    assert seen[0] == int((stages >= 2).sum()) and (len(seen) == 1 or seen[1] == int((stages >= 3).sum()))
    seen.clear()
    chain.infer(x, 0.0)
    assert seen == []  # an empty sub-batch is never run


def test_simulation_matches_real_inference():
    chain = small_chain()
    x, y = torch.randn(64, 3, 2, 2) * 3, torch.randint(0, 5, (64,))
    with torch.no_grad():
        prefixes = chain.stage_logits(x)
    confidences = torch.stack([max_probability(p) for p in prefixes[:-1]])
    correct = torch.stack([p.argmax(1) == y for p in prefixes])
    thresholds = torch.tensor([[0.4, 0.6], [0.7, 0.7]], dtype=torch.float64)
    top1, cost, share = simulate(confidences, correct, [3.0, 2.0, 1.0], thresholds)
    for t in range(2):
        logits, stages = chain.infer(x, thresholds[t].tolist())
        assert top1[t].item() == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
        reached = [(stages > k).float().mean().item() for k in range(3)]
        assert share[t].tolist() == pytest.approx(reached)
        assert cost[t].item() == pytest.approx(3 * reached[0] + 2 * reached[1] + reached[2])


def test_count_flops():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    assert count_flops(model, (3, 2, 2)) == 2 * (12 * 16 + 16 * 5)


# ----------------------------------------------------------------------------- training and calibration

@pytest.fixture(scope="module")
def trained_chain(tmp_path_factory):
    """A teacher and a 3-stage chain of MLPs on the digits (briefly trained)."""
    folder = tmp_path_factory.mktemp("reskd")
    common = dict(progress="none", eval_every=0, tensorboard=False, lr=0.05)
    train(resolve_config(student="mlp-64", epochs=3, output=str(folder / "teacher"), **common), print_fn=quiet)
    chain_file = None
    for stage, (arch, epochs) in enumerate((("mlp-8", 1), ("mlp-16", 2), ("mlp-8", 2))):
        train(resolve_config(student=arch, method="reskd", teacher="mlp-64",
                             teacher_checkpoint=str(folder / "teacher" / "model.pt"), epochs=epochs,
                             reskd_chain=chain_file, output=str(folder / f"stage{stage}"), **common),
              print_fn=quiet)
        chain_file = str(folder / f"stage{stage}" / "chain.pt")
    return folder


def test_reskd_training_freezes_earlier_stages(trained_chain):
    first, _ = load_chain(trained_chain / "stage0" / "chain.pt")
    last, spec = load_chain(trained_chain / "stage2" / "chain.pt")
    assert spec["architectures"] == ["mlp-8", "mlp-16", "mlp-8"] and last.num_stages == 3
    for key, value in first.base.state_dict().items():  # the base did not move in later stages
        assert torch.equal(value, last.base.state_dict()[key])
    summary = json.loads((trained_chain / "stage2" / "summary.json").read_text())
    from kdfast.data import make_loader

    val = make_loader("digits", "val", batch_size=540)
    images, labels, _ = next(iter(val))
    with torch.no_grad():
        top1 = 100 * (last(images).argmax(1) == labels).float().mean().item()
    assert top1 == pytest.approx(summary["top1"], abs=1e-4)  # the run evaluated the whole chain
    saved = torch.load(trained_chain / "stage2" / "model.pt", weights_only=True)
    assert set(saved) == set(last.res_students[1].state_dict())  # model.pt: the new res-student


def test_chain_stage_keeps_frozen_batchnorm():
    chain = ResidualChain(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3)))
    stage = ChainStage(chain, nn.Linear(4, 3)).train()
    assert not chain.training and stage.student.training
    before = chain.base[0].running_mean.clone()
    stage(torch.randn(8, 4) + 5)
    assert torch.equal(chain.base[0].running_mean, before)
    assert all(not p.requires_grad for p in chain.parameters())


def test_calibration_budgets(trained_chain):
    from kdfast.data import make_loader

    chain, _ = load_chain(trained_chain / "stage2" / "chain.pt")
    val = make_loader("digits", "val", batch_size=128)
    exact = calibrate(chain, val, max_accuracy_drop=0.0)
    assert exact.top1 >= exact.full_top1 - 1e-9 and exact.flops <= exact.full_flops + 1e-6
    loose = calibrate(chain, val, max_accuracy_drop=5.0)
    assert loose.flops <= exact.flops and loose.top1 >= loose.full_top1 - 5.0 - 1e-9
    budget = calibrate(chain, val, target_flops=0.5 * exact.full_flops)
    assert budget.flops <= 0.5 * exact.full_flops + 1e-6
    # what calibration predicts is what gated inference does
    correct = total = 0
    for images, labels, _ in val:
        logits, _ = chain.infer(images, budget.thresholds)
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
    assert 100 * correct / total == pytest.approx(budget.top1, abs=1e-6)
    with pytest.raises(ValueError, match="exactly one budget"):
        calibrate(chain, val)
    with pytest.raises(ValueError, match="no thresholds fit"):
        calibrate(chain, val, target_flops=1.0)


def test_curve_command(trained_chain, tmp_path):
    from kdfast import cli

    status = cli.main(["reskd", "curve", "--chain", str(trained_chain / "stage2" / "chain.pt"), "--teacher", "mlp-64",
                       "--teacher-checkpoint", str(trained_chain / "teacher" / "model.pt"), "--points", "5",
                       "--output", str(tmp_path / "curve")])
    assert status == 0
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert [p["stages"] for p in curve["chain_prefixes"]] == [1, 2, 3]
    gated = {p["threshold"]: p for p in curve["gated"]}
    assert gated[0.0]["top1"] == pytest.approx(curve["chain_prefixes"][0]["top1"])
    assert gated[1.0]["top1"] == pytest.approx(curve["chain_prefixes"][-1]["top1"])
    assert gated[1.0]["flops"] == pytest.approx(sum(curve["stage_flops"]))
    assert "teacher" in curve["references"]
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 10_000
