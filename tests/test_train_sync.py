"""The trainer's step without host–device synchronization.

CPU: DR-KD's bank (read, write, checkpoint round trip) and its masked loss, which must equal
the former row selection (``nonzero``) in value and gradient. GPU: one full step of every
method under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

import kdfast
from kdfast import checkpoint as ckpt
from kdfast.config import resolve_config
from kdfast.models import create_model
from kdfast.train import KDStep, LogitBank, MethodLoss, Runtime, drkd_bank_loss, make_loaders

TAU = 4.0
CPU_RUNTIME = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def row_selection(student, previous, valid, labels, tau, backend):
    """The trainer's DR-KD term before the bank moved to the device: the valid rows picked by ``nonzero``."""
    rows = valid.nonzero().squeeze(1)
    if len(rows) == 0:
        return student.new_zeros((), dtype=torch.float32)
    share = len(rows) / len(student)
    return share * kdfast.drkd_loss(student[rows], previous[rows], labels[rows], tau, backend=backend)


def drkd_inputs(batch=24, classes=10, dtype=torch.float32, seed=0):
    """(student [B, C] of ``dtype``, bank logits [B, C] float32, labels [B]) with ties at the student's max.

    Half the student rows are multiples of 0.5 in [-2, 2] (so most of them have several
    maximal entries, in every dtype); the bank's logits are those of a bf16 bank.
    """
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=g) * 3
    student[::2] = torch.randint(-4, 5, (batch // 2 + batch % 2, classes), generator=g) * 0.5
    previous = (torch.randn(batch, classes, generator=g) * 3).to(torch.bfloat16).float()
    labels = torch.randint(0, classes, (batch,), generator=g)
    labels[:4] = previous[:4].argmax(1)  # rows the rectification leaves as they are
    return student.to(dtype), previous, labels


def gradient(loss, student):
    (grad,) = torch.autograd.grad(loss, student, allow_unused=True)
    return torch.zeros_like(student) if grad is None else grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern", ["some", "all", "none"])
def test_drkd_masked_loss_equals_row_selection(backend_device, dtype, pattern):
    """Value and student gradient of the masked loss are the former ``share · drkd_loss(rows)``; the
    rows without a previous-epoch logit contribute exactly 0 and get exactly zero gradient."""
    backend, device = backend_device
    student, previous, labels = drkd_inputs(dtype=dtype)
    valid = {"some": torch.rand(len(labels), generator=torch.Generator().manual_seed(1)) < 0.5,
             "all": torch.ones(len(labels), dtype=torch.bool),
             "none": torch.zeros(len(labels), dtype=torch.bool)}[pattern]
    if pattern == "some":
        valid[:2], valid[2:4] = True, False  # both kinds among the rows with ties too
        assert 0 < int(valid.sum()) < len(valid)
    ties = (student.float() == student.float().max(1, keepdim=True).values).sum(1) > 1
    assert bool(ties[~valid].any()) or pattern == "all"  # some rows fed their own logits have ties
    student, previous, labels, valid = (t.to(device) for t in (student, previous, labels, valid))
    student.requires_grad_(True)

    masked = drkd_bank_loss(student, previous, valid, labels, TAU, backend)
    assert masked.dtype == torch.float32
    masked_grad = gradient(masked, student)
    assert torch.count_nonzero(masked_grad[~valid]) == 0  # KL(p ‖ p): exactly no gradient
    if pattern == "none":  # the first epoch, or a batch of samples not seen in the previous one
        assert masked.item() == 0.0
        return
    expected = row_selection(student, previous, valid, labels, TAU, backend)
    expected_grad = gradient(expected, student)
    torch.testing.assert_close(masked, expected, rtol=2e-6, atol=1e-7)
    # fp32: the two sum the same rows in a different order; bf16: gradients rounded once, to bf16.
    tolerance = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(masked_grad, expected_grad, **tolerance)


def test_drkd_masked_loss_with_no_valid_row_is_zero_for_any_logits(backend_device):
    """Extreme and constant rows as their own teacher: still exactly 0, with exactly zero gradient."""
    backend, device = backend_device
    student = torch.tensor([[60.0, -60.0, 0.0, 1e-3], [2.0, 2.0, 2.0, 2.0], [-1e4, 0.0, 0.0, 5.0]], device=device)
    student.requires_grad_(True)
    valid = torch.zeros(3, dtype=torch.bool, device=device)
    previous = torch.randn(3, 4).to(device)
    labels = torch.tensor([1, 3, 0], device=device)
    loss = drkd_bank_loss(student, previous, valid, labels, TAU, backend)
    assert loss.item() == 0.0 and torch.count_nonzero(gradient(loss, student)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_method_loss_drkd_matches_the_former_step(dtype):
    """MethodLoss's DR-KD term through a bank filled in epoch 0: the row-selection value, and the bank
    keeps each sample's newest logits; epoch 0 gives exactly 0 without a graph."""
    cfg = resolve_config(method="drkd", kd_weight=0.7, backend="cpu")
    num_samples, classes = 40, 10
    loss_fn = MethodLoss(cfg, classes, num_samples, "cpu")
    student, previous, labels = drkd_inputs(batch=16, classes=classes, dtype=dtype)
    seen = torch.arange(0, 32, 4)  # 8 samples that get logits in epoch 0

    terms = loss_fn(previous[:8].to(dtype), None, None, None, labels[:8], seen, 0, CPU_RUNTIME)
    assert terms["drkd"].item() == 0.0 and not terms["drkd"].requires_grad
    assert torch.equal(loss_fn.bank.epoch[seen], torch.zeros(8, dtype=torch.int64))

    indices = torch.cat([seen, torch.arange(1, 33, 4)])[torch.randperm(16, generator=torch.Generator().manual_seed(2))]
    bank_rows, valid = loss_fn.bank.read(indices, 1)
    assert int(valid.sum()) == 8 and torch.equal(valid, (indices % 4) == 0)
    student.requires_grad_(True)
    terms = loss_fn(student, None, None, None, labels, indices, 1, CPU_RUNTIME)
    expected = cfg.kd_weight * row_selection(student, bank_rows, valid, labels, cfg.resolved_temperature(), "cpu")
    torch.testing.assert_close(terms["drkd"], expected, rtol=2e-6, atol=1e-7)
    assert torch.equal(loss_fn.bank.logits[indices], student.detach().float())
    assert torch.equal(loss_fn.bank.epoch[indices], torch.ones(16, dtype=torch.int64))


# ----------------------------------------------------------------------------- the bank

BANK_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", BANK_DEVICES)
def test_bank_read_write_round_trip(device):
    bank = LogitBank(10, 4, device)
    assert bank.logits.device.type == device and bank.logits.dtype == torch.float32
    first = torch.randn(3, 4, device=device)
    bank.write(torch.tensor([3, 0, 7], device=device), first, 0, CPU_RUNTIME)
    logits, valid = bank.read(torch.tensor([0, 3, 5, 7], device=device), 1)
    assert logits.device.type == device and logits.dtype == torch.float32 and valid.device.type == device
    assert valid.tolist() == [True, True, False, True]
    assert torch.equal(logits, torch.stack([first[1], first[0], torch.zeros(4, device=device), first[2]]))
    assert not bank.read(torch.tensor([0, 3], device=device), 0)[1].any()  # only epoch - 1 counts
    second = torch.randn(2, 4, device=device, dtype=torch.bfloat16)  # autocast logits
    bank.write(torch.tensor([7, 5], device=device), second, 1, CPU_RUNTIME)
    logits, valid = bank.read(torch.tensor([7, 3, 5], device=device), 2)
    assert valid.tolist() == [True, False, True]
    assert torch.equal(logits[[0, 2]], second.float()) and torch.equal(logits[1], first[0])


@pytest.mark.parametrize("device", BANK_DEVICES)
def test_bank_state_dict_round_trip(device):
    bank = LogitBank(6, 3, device)
    bank.write(torch.tensor([4, 1], device=device), torch.randn(2, 3, device=device), 2, CPU_RUNTIME)
    state = bank.state_dict()
    assert all(t.device.type == "cpu" for t in state.values())  # a checkpoint written on a GPU loads anywhere
    buffer = io.BytesIO()
    torch.save({"bank": state}, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)["bank"]
    again = LogitBank(6, 3, device)
    again.load_state_dict(loaded)
    assert again.logits.device.type == device and again.epoch.device.type == device
    assert torch.equal(again.logits, bank.logits) and torch.equal(again.epoch, bank.epoch)
    with pytest.raises(ValueError, match=r"DR-KD bank logits has shape \(6, 3\), this run's \(6, 4\)"):
        LogitBank(6, 4, device).load_state_dict(loaded)


def test_bank_dtype_rule():
    """fp32 up to 64 M entries, bf16 beyond (on the meta device: nothing is allocated)."""
    assert LogitBank(2**16, 1024, "meta").logits.dtype == torch.float32
    assert LogitBank(2**16 + 1, 1024, "meta").logits.dtype == torch.bfloat16
    assert LogitBank(1_281_167, 1000, "meta").logits.dtype == torch.bfloat16  # ImageNet: about 2.6 GB


def test_checkpointed_bank_resumes_into_a_new_run(tmp_path):
    """The bank through a kdfast checkpoint file (checksum, CPU map_location), as --resume reads it."""
    bank = LogitBank(5, 2)
    bank.write(torch.tensor([2]), torch.tensor([[1.5, -0.5]]), 0, CPU_RUNTIME)
    path = ckpt.write_checkpoint(tmp_path, {"bank": bank.state_dict()}, 1)
    again = LogitBank(5, 2)
    again.load_state_dict(ckpt.read_checkpoint_file(path)["bank"])
    logits, valid = again.read(torch.tensor([2, 3]), 1)
    assert valid.tolist() == [True, False] and logits[0].tolist() == [1.5, -0.5]


# ----------------------------------------------------------------------------- GPU: no sync in a step

METHODS = ["ce", "kd", "dist", "cmkd", "drkd", "pesf", "reskd", "reskd-base"]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """An (untrained) mlp-128 teacher file and a one-stage ResKD chain file, for the digits' shapes."""
    from kdfast.reskd import save_chain

    folder = tmp_path_factory.mktemp("sync")
    torch.manual_seed(0)
    torch.save(create_model("mlp-128", 10, in_channels=1, image_size=8).state_dict(), folder / "teacher.pt")
    save_chain(folder / "chain.pt", ["mlp-32"], [create_model("mlp-32", 10, in_channels=1, image_size=8)],
               num_classes=10, in_channels=1, image_size=8)
    return folder


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("method", METHODS)
def test_kd_step_runs_without_host_sync(tmp_path, model_files, method, backend):
    """One full training step (teacher and student forward under bf16 autocast, loss, backward, SGD,
    schedule) queues its work without a single host–device synchronization.

    A warm-up step runs first, outside the check (first allocations, cuBLAS initialization,
    Triton compilation and autotuning may synchronize); the data is on the device before the
    checked step. DR-KD's checked step is in epoch 1 with some rows from the bank (written in
    epoch 0) and some without, so both paths of its masked loss run.
    """
    extra = {"reskd": dict(reskd_chain=str(model_files / "chain.pt")), "pesf": dict(rectify=True)}.get(method, {})
    cfg = resolve_config(student="mlp-32", method=method.split("-")[0], teacher="mlp-128",
                         teacher_checkpoint=str(model_files / "teacher.pt"), device="cuda", amp="bf16",
                         backend=backend, batch_size=64, epochs=2, lr=0.05, progress="none", eval_every=0,
                         tensorboard=False, output=str(tmp_path / "run"), **extra)
    runtime = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", torch.cuda.current_device()))
    train_loader, _ = make_loaders(cfg, runtime)
    step = KDStep(cfg, runtime, train_loader)
    step.wrap()
    step.model.train()
    a, b = (tuple(batch) for batch in itertools.islice(train_loader.iterate(0, 0), 2))
    assert all(t.device.type == "cuda" for t in (*a, *b))

    if method == "drkd":
        assert step.loss_fn.bank.logits.device.type == "cuda"
        step(*a, 0)  # epoch 0: the bank gets batch a's logits

        def mix(rows):  # half from batch a (in the bank from epoch 0), half from batch b (never seen)
            return tuple(torch.cat([x[rows], y[rows]]) for x, y in zip(a, b))

        half = len(a[1]) // 2
        warm, checked, epoch = mix(slice(0, half)), mix(slice(half, None)), 1
    else:
        warm, checked, epoch = a, b, 0
    step(*warm, epoch)
    if method == "drkd":
        valid = step.loss_fn.bank.epoch[checked[2]] == epoch - 1
        assert 0 < int(valid.sum()) < len(valid)
    torch.cuda.synchronize()

    previous_mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = step(*checked, epoch)
    finally:
        torch.cuda.set_sync_debug_mode(previous_mode)
    torch.cuda.synchronize()

    values = {name: value.item() for name, value in terms.items()}
    assert all(math.isfinite(v) for v in values.values()), values
    if method == "drkd":
        assert values["drkd"] > 0
        assert torch.equal(step.loss_fn.bank.epoch[checked[2]], torch.full_like(checked[2], epoch))
