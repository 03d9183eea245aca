"""A short, real distillation on scikit-learn's bundled handwritten digits (``make demo``).

A teacher MLP is trained with cross-entropy; then a much smaller student is trained from
the same initialization with cross-entropy alone, with Hinton KD (``kdfast.kd_loss``),
with DIST (``kdfast.dist_loss``) and with CMKD (``kdfast.cmkd_loss``), over several
seeds, and the validation accuracies are printed. Nothing is downloaded: the digits
(1,797 8×8 images, 10 classes) ship inside scikit-learn.

Run ``python -m kdfast.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import kdfast


def load_digits(seed: int = 0, val_fraction: float = 0.3):
    """Digits as float tensors in [0, 1]: (x_train, y_train, x_val, y_val), a stratified split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        data.data / 16.0, data.target, test_size=val_fraction, random_state=seed, stratify=data.target
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_val), as_y(y_val)


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model, x, y, loss_fn, epochs, batch_size, lr, seed, teacher_logits=None):
    """Mini-batch AdamW with a cosine schedule; ``loss_fn(student_logits, teacher_logits, target)``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            teacher = None if teacher_logits is None else teacher_logits[batch]
            loss = loss_fn(model(x[batch]), teacher, y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model


def student_methods(temperature: float):
    """Each method's loss of (student logits, teacher logits, targets); all keep the CE term."""
    return {
        "ce": lambda s, t, y: F.cross_entropy(s, y),
        "kd": lambda s, t, y: F.cross_entropy(s, y) + kdfast.kd_loss(s, t, temperature),
        "dist": lambda s, t, y: F.cross_entropy(s, y) + kdfast.dist_loss(s, t, temperature=1.0, beta=2.0, gamma=2.0),
        "cmkd": lambda s, t, y: kdfast.cmkd_loss(s, t, y, temperature),
    }


def run(epochs: int = 60, seeds: int = 3, teacher_widths=(64, 256, 256, 10), student_widths=(64, 16, 10),
        temperature: float = 4.0, batch_size: int = 64, lr: float = 3e-3, print_fn=print) -> dict:
    """Train the teacher and every student; returns {method: [accuracy per seed]} plus the teacher's."""
    x_train, y_train, x_val, y_val = load_digits()
    print_fn(f"digits: {len(x_train)} train / {len(x_val)} val images, 10 classes; backends: "
             + ", ".join(name for name, status in kdfast.backends().items() if status.available))

    torch.manual_seed(0)
    start = time.perf_counter()
    teacher = train(mlp(list(teacher_widths)), x_train, y_train, student_methods(temperature)["ce"],
                    40, batch_size, lr, seed=0)
    teacher_accuracy = accuracy(teacher, x_val, y_val)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    print_fn(f"teacher {list(teacher_widths)} ({teacher_params} params): val top-1 {100 * teacher_accuracy:.2f}% "
             f"({time.perf_counter() - start:.1f}s)")
    with torch.no_grad():
        teacher.eval()
        teacher_logits = teacher(x_train)

    student_params = sum(p.numel() for p in mlp(list(student_widths)).parameters())
    print_fn(f"student {list(student_widths)} ({student_params} params), {seeds} seeds, {epochs} epochs, "
             f"temperature {temperature}:")
    results = {"teacher": [teacher_accuracy]}
    for method, loss_fn in student_methods(temperature).items():
        start = time.perf_counter()
        scores = []
        for seed in range(seeds):
            torch.manual_seed(100 + seed)  # the same initialization for every method
            student = train(mlp(list(student_widths)), x_train, y_train, loss_fn, epochs, batch_size, lr,
                            seed=seed, teacher_logits=teacher_logits)
            scores.append(accuracy(student, x_val, y_val))
        results[method] = scores
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print_fn(f"  {method:5s} val top-1 {100 * statistics.mean(scores):6.2f}% ± {100 * spread:4.2f}  "
                 f"({(time.perf_counter() - start) / seeds:.1f}s per run)")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60, help="student epochs (the teacher trains 40)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=4.0)
    args = parser.parse_args(argv)
    run(epochs=args.epochs, seeds=args.seeds, temperature=args.temperature)


if __name__ == "__main__":
    main()
