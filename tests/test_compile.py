"""Every loss and soft rank/sort traces into one graph under torch.compile(fullgraph=True).

The ``aot_eager`` backend traces forward and backward through the fake implementations
of kdfast's operators without paying for Inductor's code generation.
"""

import pytest
import torch

import kdfast


def _losses(s, t, y):
    return (
        kdfast.kd_loss(s, t)
        + kdfast.pearson_loss(s, t, dim=0)
        + kdfast.dist_loss(s, t)
        + kdfast.spearman_loss(s, t)
        + kdfast.cmkd_loss(s, t, y)
        + kdfast.drkd_loss(s, t, y, ce_weight=0.5)
        + kdfast.soft_rank(s, "kl", 0.5).mean()
        + kdfast.soft_sort(s, "l2", 0.5)[:, -1].mean()
    )


def test_losses_compile_without_graph_breaks():
    torch._dynamo.reset()
    s, t, y = torch.randn(6, 11), torch.randn(6, 11), torch.randint(0, 11, (6,))
    compiled = torch.compile(_losses, fullgraph=True, backend="aot_eager")
    s1 = s.clone().requires_grad_()
    loss = compiled(s1, t, y)
    loss.backward()
    s2 = s.clone().requires_grad_()
    expected = _losses(s2, t, y)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(s1.grad, s2.grad)


def test_data_checks_become_device_assertions_when_compiled():
    torch._dynamo.reset()
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    compiled = torch.compile(lambda a, b, c: kdfast.cmkd_loss(a, b, c, check_finite=True),
                             fullgraph=True, backend="aot_eager")
    compiled(s, t, torch.tensor([0, 1, 4]))
    with pytest.raises(RuntimeError, match=r"target values must lie in \[0, 4\]"):
        compiled(s, t, torch.tensor([0, 1, 5]))
    with pytest.raises(RuntimeError, match="student contains NaN or Inf"):
        compiled(s.masked_fill(s > 1, float("nan")), t, torch.tensor([0, 1, 4]))


@pytest.mark.parametrize("backend,compiler", [("torch", "aot_eager"), ("cpu", "aot_eager"), ("cpu", "inductor"),
                                              pytest.param("triton", "aot_eager", marks=pytest.mark.interpreter)])
def test_training_step_compiles_fullgraph(backend, compiler):
    # student forward → kdfast loss under torch.compile(fullgraph=True); backward runs the
    # compiled backward graph; gradients equal the eager step's.
    torch._dynamo.reset()
    student = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 9))
    x, t, y = torch.randn(8, 12), torch.randn(8, 9), torch.randint(0, 9, (8,))

    def step(inputs, teacher, target):
        logits = student(inputs)
        return kdfast.cmkd_loss(logits, teacher, target, backend=backend) + kdfast.dist_loss(logits, teacher,
                                                                                              backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    loss = compiled(x, t, y)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    expected = step(x, t, y)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, (p.grad for p in student.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
