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
# Several blocks per launch (the last one partial): (64, 1000), (300, 100), (5, 1025), and
# the two-pass path past 4096 classes: (2, 5000), (9, 8193).
@pytest.mark.parametrize("active, classes", [(0, 5), (1, 1), (1, 2), (3, 7), (37, 10), (129, 3), (64, 1000), (300, 100),
                                             (5, 1025), (2, 5000), (9, 8193)])
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


# ----------------------------------------------------------------------------- argument checks and bounded cost
# (issue 12, item 16: clear errors before anything runs; the curve's cost does not grow with its points)

def old_gated_evaluation(chain, loader, thresholds, flops):
    """The curve's gated points before the curve was simulated (commit 079049d), verbatim:
    real gated inference over the loader at one threshold."""
    correct = total = 0
    reached = torch.zeros(chain.num_stages, dtype=torch.float64)
    for images, labels, _ in loader:
        logits, stages = chain.infer(images, thresholds)
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
        for k in range(chain.num_stages):
            reached[k] += (stages > k).sum().item()
    share = (reached / total).tolist()
    return {"top1": 100 * correct / total, "flops": float(sum(s * f for s, f in zip(share, flops))),
            "stage_fractions": share}


@pytest.mark.parametrize("batch_size", [128, 256])
def test_curve_equals_real_gated_inference(trained_chain, batch_size):
    """Counted from one pass, every gated point equals what real gated inference gives (the old
    curve) at the same thresholds, exactly; with measure=0 nothing is measured."""
    from kdfast.data import make_loader
    from kdfast.reskd import accuracy_cost_curve

    chain, _ = load_chain(trained_chain / "stage2" / "chain.pt")
    val = make_loader("digits", "val", batch_size=batch_size)
    simulated = accuracy_cost_curve(chain, val, points=25, measure=0)
    assert simulated["gated_check"]["measured_thresholds"] == []
    assert len(simulated["gated"]) > 20
    for point in simulated["gated"]:
        assert point == {"threshold": point["threshold"],
                         **old_gated_evaluation(chain, val, point["threshold"], simulated["stage_flops"])}
    measured = accuracy_cost_curve(chain, val, points=25)  # the default: 5 thresholds measured for real
    check = measured.pop("gated_check")
    assert check["max_top1_difference"] == 0.0 and check["max_flops_difference"] == 0.0
    assert len(check["measured_thresholds"]) == 5 and {0.0, 1.0} <= set(check["measured_thresholds"])
    simulated.pop("gated_check")
    assert measured == simulated


def test_curve_cost_does_not_grow_with_points(trained_chain, monkeypatch):
    """2000 points: one pass of every stage plus `measure` passes of gated inference, not 2000."""
    from kdfast.data import make_loader
    from kdfast.reskd import accuracy_cost_curve

    chain, _ = load_chain(trained_chain / "stage2" / "chain.pt")
    val = make_loader("digits", "val", batch_size=256)
    batches = len(list(val))
    calls = {"infer": 0, "base": 0}
    real_infer = ResidualChain.infer
    monkeypatch.setattr(ResidualChain, "infer", lambda self, *a, **k: (calls.__setitem__("infer", calls["infer"] + 1),
                                                                       real_infer(self, *a, **k))[1])
    chain.base.register_forward_hook(lambda *_: calls.__setitem__("base", calls["base"] + 1))
    curve = accuracy_cost_curve(chain, val, points=2000, measure=3)
    assert len(curve["gated"]) > 1000
    assert calls["infer"] == 3 * batches  # the 3 measured thresholds, each one pass
    assert calls["base"] <= 1 + 4 * batches  # FLOP counting once, the collecting pass and the 3 measured
    calls.update(infer=0)
    accuracy_cost_curve(chain, val, points=2000, measure=0)
    assert calls["infer"] == 0


def test_curve_command_rejects_bad_points(trained_chain, tmp_path, capsys):
    from kdfast import cli

    chain_file = str(trained_chain / "stage2" / "chain.pt")
    for points, message in (("-3", "points must be between 1 and"), ("0", "points must be between 1 and"),
                            ("10001", "points must be between 1 and 10000")):
        status = cli.main(["reskd", "curve", "--chain", chain_file, "--points", points, "--output", str(tmp_path)])
        err = capsys.readouterr().err
        assert status == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "curve.json").exists()


def test_curve_command_rejects_images_that_do_not_fit_the_chain(trained_chain, tmp_path, capsys):
    """A chain trained on the 1-channel digits, run on a 3-channel JPEG folder: a clear error."""
    from kdfast import cli
    from kdfast.data import write_digits_folder

    write_digits_folder(tmp_path / "rgb", size=8)
    status = cli.main(["reskd", "curve", "--chain", str(trained_chain / "stage2" / "chain.pt"), "--data",
                       str(tmp_path / "rgb"), "--output", str(tmp_path / "curve")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert "(3, 8, 8)" in err and "3 channel(s), but the chain takes 1" in err, err


def conv_chain(tmp_path, in_channels=1, image_size=8):
    """An untrained 2-stage ResNet-8/w4 chain written and read back as a chain file."""
    from kdfast.models import create_model
    from kdfast.reskd import save_chain

    torch.manual_seed(0)
    modules = [create_model("resnet8_w4", 10, in_channels, image_size) for _ in range(2)]
    save_chain(tmp_path / "chain.pt", ["resnet8_w4"] * 2, modules, num_classes=10, in_channels=in_channels,
               image_size=image_size)
    chain, spec = load_chain(tmp_path / "chain.pt")
    assert (chain.in_channels, chain.image_size) == (in_channels, image_size) == (spec["in_channels"],
                                                                                  spec["image_size"])
    return chain


class ListLoader:
    def __init__(self, batches, image_shape):
        self.batches, self.image_shape = batches, image_shape

    def __iter__(self):
        return iter(self.batches)


def test_chain_rejects_images_that_do_not_fit_before_any_layer(tmp_path):
    from kdfast.reskd import accuracy_cost_curve, gated_evaluation

    chain = conv_chain(tmp_path)
    ran = []  # the input shape of every call of a stage
    for module in (chain.base, *chain.res_students):
        module.register_forward_pre_hook(lambda module, inputs: ran.append(tuple(inputs[0].shape[1:])))
    rgb = torch.randn(4, 3, 8, 8)
    for call in (lambda: chain.infer(rgb, 0.5), lambda: chain(rgb), lambda: chain.stage_logits(rgb),
                 lambda: chain.prefix_logits(rgb, 1)):
        with pytest.raises(ValueError, match=r"x has 3 channel\(s\) \(shape \[4, 3, 8, 8\]\), but the chain takes 1"):
            call()
    with pytest.raises(ValueError, match=r"x is 16×16 pixels .* takes 8×8: expected images of shape \[B, 1, 8, 8\]"):
        chain.infer(torch.randn(2, 1, 16, 16), 0.5)
    with pytest.raises(ValueError, match=r"x must be images of shape \[B, 1, 8, 8\] .*got shape \[2, 64\]"):
        chain.infer(torch.randn(2, 64), 0.5)
    labels, indices = torch.zeros(4, dtype=torch.int64), torch.arange(4)
    rgb_loader = ListLoader([(rgb, labels, indices)], (3, 8, 8))
    for call in (lambda: accuracy_cost_curve(chain, rgb_loader), lambda: calibrate(chain, rgb_loader, target_flops=1e9),
                 lambda: gated_evaluation(chain, rgb_loader, 0.5, [1.0, 1.0])):
        with pytest.raises(ValueError, match=r"loader's image_shape is \(3, 8, 8\) \(C, H, W\): 3 channel\(s\), "
                                             r"but the chain takes 1"):
            call()
    lying = ListLoader([(rgb, labels, indices)], (1, 8, 8))  # says 1 channel, yields 3
    with pytest.raises(ValueError, match=r"a batch of the loader has 3 channel\(s\) \(shape \[4, 3, 8, 8\]\), but "
                                         r"the chain takes 1"):
        accuracy_cost_curve(chain, lying)
    assert ran == [(1, 8, 8)] * 2  # only the FLOP counting of the 2 stages ran (on zeros of the chain's shape)
    with pytest.raises(TypeError, match="loader has no image_shape"):
        accuracy_cost_curve(chain, [(torch.randn(4, 1, 8, 8), labels, indices)])
    with pytest.raises(ValueError, match="the loader yielded no images"):
        accuracy_cost_curve(chain, ListLoader([], (1, 8, 8)))
    with pytest.raises(ValueError, match=r"must hold images \[B, C, H, W\] and labels \[B\]"):
        accuracy_cost_curve(chain, ListLoader([(torch.randn(4, 1, 8, 8), labels[:3], indices)], (1, 8, 8)))
    fits = chain.infer(torch.randn(3, 1, 8, 8), 0.5)[0]
    assert fits.shape == (3, 10)


def test_infer_rejects_bad_thresholds_and_inputs():
    np = pytest.importorskip("numpy")
    chain = small_chain()
    x = torch.randn(9, 3, 2, 2) * 3
    for thresholds in (None, "0.5", b"0.5", True, {0: 0.5}, object(), torch.tensor([[0.5, 0.5]])):
        with pytest.raises(TypeError, match=r"thresholds must be a number in \[0, 1\] or a sequence of 2 number"):
            chain.infer(x, thresholds)
    with pytest.raises(TypeError, match=r"thresholds\[1\] must be a number in \[0, 1\], got '0.5'"):
        chain.infer(x, [0.5, "0.5"])
    with pytest.raises(TypeError, match=r"thresholds\[0\] must be a number in \[0, 1\], got None"):
        chain.infer(x, [None, 0.5])
    for thresholds, message in ((1.5, r"thresholds must be in \[0, 1\], got 1.5"),
                                (float("nan"), r"thresholds must be in \[0, 1\], got nan"),
                                ([0.5, -0.1], r"thresholds\[1\] must be in \[0, 1\], got -0.1"),
                                ([0.5, 0.5, 0.5], "one entry per res-student \\(2\\), got 3")):
        with pytest.raises(ValueError, match=message):
            chain.infer(x, thresholds)
    with pytest.raises(TypeError, match=r"thresholds must be a number .* got a bool ndarray of shape \[2\]"):
        chain.infer(x, np.array([True, False]))
    expected = chain.infer(x, [0.5, 0.7])
    for same in ((0.5, 0.7), torch.tensor([0.5, 0.7]), np.array([0.5, 0.7]), [np.float64(0.5), torch.tensor(0.7)]):
        got = chain.infer(x, same)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(chain.infer(x, torch.tensor(0.6))[1], chain.infer(x, 0.6)[1])
    assert torch.equal(chain.infer(x, np.array(0.6))[1], chain.infer(x, 0.6)[1])
    with pytest.raises(TypeError, match="x must be a tensor of images"):
        chain.infer(x.tolist(), 0.5)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        chain.infer(x.long(), 0.5)
    with pytest.raises(TypeError, match=r"stages must be an int in \[1, 3\]"):
        chain.prefix_logits(x, "2")


def test_curve_and_calibration_reject_bad_arguments(tmp_path):
    from kdfast.reskd import accuracy_cost_curve

    chain = conv_chain(tmp_path)
    loader = ListLoader([(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64), torch.arange(4))], (1, 8, 8))
    for points, error, message in ((-3, ValueError, "points must be between 1 and 10000"),
                                   (0, ValueError, "points must be between 1"),
                                   (10_001, ValueError, "points must be between 1 and 10000"),
                                   (2.5, TypeError, "points must be an int"),
                                   ("25", TypeError, "points must be an int"),
                                   (True, TypeError, "points must be an int")):
        with pytest.raises(error, match=message):
            accuracy_cost_curve(chain, loader, points=points)
    with pytest.raises(ValueError, match="measure must be >= 0"):
        accuracy_cost_curve(chain, loader, measure=-1)
    with pytest.raises(TypeError, match="references must be a dict of name"):
        accuracy_cost_curve(chain, loader, references={"teacher": "resnet20"})
    from kdfast.models import create_model

    with pytest.raises(ValueError, match=r"reference 'teacher' cannot run on the loader's images \(1, 8, 8\)"):
        accuracy_cost_curve(chain, loader, references={"teacher": create_model("resnet8_w4", 10, 3, 8)})
    with pytest.raises(TypeError, match="chain must be a ResidualChain"):
        accuracy_cost_curve(chain.base, loader)
    with pytest.raises(TypeError, match="target_flops must be a number or None, got '1e6'"):
        calibrate(chain, loader, target_flops="1e6")
    with pytest.raises(ValueError, match=r"image_shape is \(3, 8, 8\)"):
        calibrate(chain, loader, target_flops=1e9, image_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="image_shape must be a sequence of positive ints"):
        count_flops(chain.base, (1, 0, 8))
    assert len(accuracy_cost_curve(chain, loader, points=1, measure=1)["gated"]) >= 2  # 0, 1 and the quantile


def test_load_chain_rejects_damaged_files(tmp_path):
    from kdfast.checkpoint import save_state_dict
    from kdfast.models import create_model
    from kdfast.reskd import save_chain

    save_state_dict(tmp_path / "missing.pt", {"architectures": ["mlp-8"]})
    with pytest.raises(ValueError, match="lacks state_dicts, num_classes, in_channels, image_size"):
        load_chain(tmp_path / "missing.pt")
    save_chain(tmp_path / "wrong.pt", ["mlp-16"], [create_model("mlp-8", 10, 1, 8)], num_classes=10, in_channels=1,
               image_size=8)
    with pytest.raises(ValueError, match=r"the weights of stage 1 \(mlp-16\) do not fit the model"):
        load_chain(tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        save_chain(tmp_path / "bad.pt", ["mlp-8"], [create_model("mlp-8", 10, 1, 8)], num_classes=10, in_channels=0,
                   image_size=8)


@pytest.mark.parametrize("seed", range(4))
def test_shared_simulation_equals_the_general_one(seed):
    """simulate_shared (O(S·N + T·S) memory) gives simulate's numbers bit for bit, also with
    thresholds exactly on observed confidences and NaN confidences."""
    from kdfast.reskd import simulate_shared

    generator = torch.Generator().manual_seed(seed)
    stages, images = 1 + seed % 3 + 1, 37 + 50 * seed
    confidences = torch.rand(stages - 1, images, generator=generator, dtype=torch.float64).round(decimals=2)
    confidences[:, ::11] = float("nan")
    correct = torch.rand(stages, images, generator=generator) < 0.6
    thresholds = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), confidences[0, :20].nan_to_num(0.3),
                            torch.rand(30, generator=generator, dtype=torch.float64)])
    flops = [float(f) for f in range(3, 3 + stages)]
    general = simulate(confidences, correct, flops, thresholds[:, None].expand(-1, stages - 1))
    for a, b in zip(general, simulate_shared(confidences, correct, flops, thresholds)):
        assert torch.equal(a, b)


def test_reskd_demo_slice_reproduces_the_committed_results(tmp_path):
    """Seed 0 of `make reskd` (teacher, both plain students, the chain, its calibration):
    the same numbers to the last digit, or docs/reskd.md's table is stale (rerun `make reskd`,
    copy runs/reskd/results.json to benchmarks/results/reskd_demo_digits.json and curve.* to
    reskd_curve_digits.*, then `python benchmarks/readme_tables.py`)."""
    import json
    from pathlib import Path

    from kdfast.reskd_demo import demo

    committed = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" /
                            "reskd_demo_digits.json").read_text())
    results = demo(tmp_path, seeds=1, print_fn=lambda *_: None)
    assert results["teacher_top1"] == committed["teacher_top1"]
    ours, theirs = results["runs"][0], committed["runs"][0]
    for key in ("chain_prefixes_top1", "plain_top1", "cross_validated"):
        assert ours[key] == theirs[key], key
