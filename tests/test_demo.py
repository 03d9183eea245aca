"""The demo trains a real teacher and students on the embedded digits (shortened here)."""

import kdfast.demo


def test_demo_trains_teacher_and_students():
    lines = []
    results = kdfast.demo.run(epochs=3, seeds=1, print_fn=lines.append)
    assert set(results) == {"teacher", "ce", "kd", "dist", "cmkd"}
    assert results["teacher"][0] > 0.8  # 40 epochs of a 256-256 MLP on digits
    assert all(0.0 <= acc <= 1.0 for scores in results.values() for acc in scores)
    assert any(line.startswith("teacher") for line in lines)
    assert sum("val top-1" in line for line in lines) == 5
