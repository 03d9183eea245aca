"""Input generators and independent formulations shared by the tests."""

import numpy as np
import torch


def logits(batch, classes, dtype=torch.float64, scale=3.0, generator=None):
    return (torch.randn(batch, classes, dtype=torch.float64, generator=generator) * scale).to(dtype)


def teacher_like(batch, classes, generator=None):
    """Logits shaped like a trained classifier's: Gaussian background, one confident class.

    Returns (student, teacher, target) in float64; the student is a noisy copy of the
    teacher, so the two agree on most of their ranking.
    """
    teacher = torch.randn(batch, classes, dtype=torch.float64, generator=generator) * 2.0
    target = torch.randint(0, classes, (batch,), generator=generator)
    teacher[torch.arange(batch), target] += 10.0
    noise = torch.randn(batch, classes, dtype=torch.float64, generator=generator)
    student = teacher + 0.7 * teacher.std(dim=1, keepdim=True, correction=0) * noise
    return student, teacher, target


def dist_paper(z_s, z_t, beta=1.0, gamma=1.0, tau=1.0, eps=1e-8):
    """DIST, transcribed from the authors' published code (Huang et al., NeurIPS 2022).

    The code adds ``eps`` to the norm product where kdfast takes ``max(product, 1e-8)``.
    """

    def cosine_similarity(a, b):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a, b):
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    def intra_class_relation(y_s, y_t):
        return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))

    y_s = (z_s / tau).softmax(dim=1)
    y_t = (z_t / tau).softmax(dim=1)
    inter_loss = tau**2 * inter_class_relation(y_s, y_t)
    intra_loss = tau**2 * intra_class_relation(y_s, y_t)
    return beta * inter_loss + gamma * intra_loss


def rectify_loop(teacher, target):
    """DR-KD rectification, one row at a time in NumPy."""
    out = teacher.detach().cpu().numpy().copy()
    for i, y in enumerate(target.tolist()):
        j = int(np.argmax(out[i]))
        if j != y:
            out[i, j], out[i, y] = out[i, y], out[i, j]
    return torch.from_numpy(out)


def random_teacher_file(folder, arch: str, channels: int, size: int):
    """A saved randomly initialized zoo model with non-trivial BatchNorm statistics and scales
    (so that every layer matters in eval mode): the teachers of the cache and replay tests."""
    from kdfast.checkpoint import save_state_dict
    from kdfast.models import create_model

    torch.manual_seed(1)
    model = create_model(arch, 10, channels, size)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    path = folder / f"{arch}-{channels}-{size}.pt"
    save_state_dict(path, model.state_dict())
    return path


def small_digits_folder(root, size: int = 16, per_class: int = 12):
    """The digits as a ``size`` px JPEG folder under ``root`` with ``per_class`` training images per class."""
    from kdfast.data import write_digits_folder

    write_digits_folder(root, size=size)
    for class_folder in (root / "train").iterdir():
        for extra in sorted(class_folder.iterdir())[per_class:]:
            extra.unlink()
    return root
