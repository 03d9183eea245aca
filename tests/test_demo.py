"""The demo: every method and seed through the trainer (shortened), and a slice of the real
demo that must reproduce the committed results behind the README's table exactly."""

import json
from pathlib import Path

import kdfast.demo
from kdfast.demo import METHODS

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "demo_digits.json"


def test_demo_trains_every_method_and_writes_the_report(tmp_path):
    lines = []
    results = kdfast.demo.run(tmp_path, teacher_epochs=3, epochs=2, seeds=2, print_fn=lines.append)
    assert list(results) == ["teacher", *METHODS]
    assert results["teacher"]["top1"][0] > 50  # 3 epochs of a ResNet-20
    assert all(len(results[method]["top1"]) == 2 for method in METHODS)
    assert all(0.0 <= top1 <= 100.0 for entry in results.values() for top1 in entry["top1"])
    assert sum(" seed " in line and "val top-1" in line for line in lines) == 2 * len(METHODS)  # a line per run
    assert any(line.startswith("  kd     val top-1") and "vs ce" in line for line in lines)
    table = (tmp_path / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} | resnet8 |" in table
    assert (tmp_path / "results.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["kd"]["top1"] == results["kd"]["top1"]
    assert saved["settings"]["per_class"] == 10 and saved["settings"]["commit"]
    for method in METHODS:  # each student is a full run folder, evaluated along the way
        assert (tmp_path / f"{method}-seed1" / "model.pt").is_file()
        assert (tmp_path / f"{method}-seed1" / "config.yaml").is_file()


def test_demo_slice_reproduces_the_committed_results(tmp_path):
    """The teacher and seed 0 of ce and kd, with the committed demo's settings: the same
    top-1 to the last digit, or the README's table is stale (rerun `make demo`, copy
    runs/demo/results.json and results.png to benchmarks/results/demo_digits.*, then
    `python benchmarks/readme_tables.py`)."""
    committed = json.loads(COMMITTED.read_text())
    settings = committed["settings"]
    results = kdfast.demo.run(tmp_path, settings["teacher"], settings["student"], settings["teacher_epochs"],
                              settings["epochs"], 1, ("ce", "kd"), settings["per_class"], print_fn=lambda *_: None)
    assert results["teacher"]["top1"][0] == committed["results"]["teacher"]["top1"][0]
    for method in ("ce", "kd"):
        assert results[method]["top1"][0] == committed["results"][method]["top1"][0], method
