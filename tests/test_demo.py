"""The demo trains a real teacher and a student per method and seed on the digits (shortened here)."""

import json

import kdfast.demo
from kdfast.demo import METHODS


def test_demo_trains_every_method_and_writes_the_report(tmp_path):
    lines = []
    results = kdfast.demo.run(tmp_path, teacher_epochs=3, epochs=1, seeds=2, print_fn=lines.append)
    assert list(results) == ["teacher", *METHODS]
    assert results["teacher"]["top1"][0] > 50  # 3 epochs of a ResNet-20
    assert all(len(results[method]["top1"]) == 2 for method in METHODS)
    assert all(0.0 <= top1 <= 100.0 for entry in results.values() for top1 in entry["top1"])
    assert sum("val top-1" in line for line in lines) == 1 + len(METHODS)
    table = (tmp_path / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} | resnet8 |" in table
    assert (tmp_path / "results.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["kd"]["top1"] == results["kd"]["top1"]
    for method in METHODS:  # each student is a full run folder
        assert (tmp_path / f"{method}-seed1" / "model.pt").is_file()
        assert (tmp_path / f"{method}-seed1" / "config.yaml").is_file()
