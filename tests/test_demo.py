"""`vr-plugin demo`, reduced (--quick): every stage runs, the report holds what was measured, the models reload."""

import json
import os
import re
import sys

import pytest
from transformers import AutoModelForImageTextToText

from vr_plugin import read_pruning, read_region
from vr_plugin.cli import main
from vr_plugin.demo import DemoConfig, _plots, answer_prior

pytestmark = pytest.mark.slow

HAS_MATPLOTLIB = True
try:
    import matplotlib  # noqa: F401
except ImportError:
    HAS_MATPLOTLIB = False


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "vr_demo"
    code = main(["demo", "--quick", "--out", str(out), "--no_progress"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_demo_writes_report_and_pictures(demo, capsys):
    out, results = demo
    assert (out / "report.md").is_file()
    if HAS_MATPLOTLIB:
        for picture in ("layers.png", "loss.png"):
            assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("base", "region", "full", "region-pruned", "full-pruned"):
        assert (out / "eval" / f"{name}.json").is_file()
    assert results["config"] == {**vars(DemoConfig.quick())}


def test_report_table_is_the_measured_numbers(demo):
    out, results = demo
    report = (out / "report.md").read_text()
    rows = results["rows"]
    assert [r["layers"] for r in rows] == ["8/8", "8/8", "8/8", "6/8", "6/8"]
    base, full, region, region_pruned, full_pruned = rows
    assert region["share"] < full["share"] < 1  # the region trains fewer parameters; the vision tower never trains
    for row in rows:
        accuracy = json.loads((out / "eval" / f"{_eval_name(row)}.json").read_text())["accuracy"]
        assert row["accuracy"] == accuracy
        line = next(line for line in report.splitlines() if line.startswith(f"| {row['run']} |"))
        assert f"| {100 * accuracy:.1f}% |" in line
        if row["seconds"] is not None:
            assert f"| {row['seconds']:.1f} s | {row['cpu_seconds']:.1f} s |" in line
            assert f"| {100 * row['share']:.1f}% |" in line
    assert f"took **{results['seconds']:.0f} s**" in report
    assert f"{100 * results['answer_prior']:.1f}%" in report
    # the scores in the report are those in scores/
    scores = json.loads((out / "scores" / "region.json").read_text())["scores"]
    for layer, score in scores.items():
        assert re.search(rf"^\| {layer} \| (yes)? \| {float(score):.4f} \|", report, re.M)


def _eval_name(row):
    run = row["run"]
    if run.startswith("base"):
        return "base"
    name = "region" if run.startswith("visual region") else "full"
    return f"{name}-pruned" if "pruned" in run else name


def test_models_reload_with_region_and_pruning_records(demo):
    out, _ = demo
    models = out / "models"
    assert read_region(str(models / "region")).layers == [1, 7]
    assert read_region(str(models / "full")).layers == list(range(8))
    record = read_pruning(str(models / "region-pruned"))
    assert len(record.removed) == 2 and not set(record.removed) & {1, 7}  # only layers outside the region
    assert read_region(str(models / "region-pruned")).layers == [record.kept.index(1), record.kept.index(7)]
    model = AutoModelForImageTextToText.from_pretrained(models / "region-pruned")
    assert len(model.model.language_model.layers) == 6


def test_answer_prior_is_measured(demo):
    out, results = demo
    data = out / "data"
    assert answer_prior(str(data / "train.json"), str(data / "test.json")) == results["answer_prior"]


def test_without_matplotlib_the_report_still_comes(demo, monkeypatch, caplog, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with caplog.at_level("WARNING", logger="vr_plugin"):
        assert _plots(str(tmp_path), DemoConfig.quick(), {}, {}, None, {}) is None
    assert "matplotlib is not installed (pip install 'vr-plugin[plot]')" in caplog.text
    assert not os.listdir(tmp_path)


def test_demo_bad_inputs(capsys, tmp_path):
    assert main(["demo", "--quick", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "vr-plugin demo: error: demo steps must be >= 1, got 0"
    assert main(["demo", "--quick", "--num_layers", "2", "--out", str(tmp_path)]) == 2
    assert "demo remove=2: 2 layers leave 1 outside the region to prune" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["demo", "--quick", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vr-plugin demo: error: ") and "file" in err and len(err.strip().splitlines()) == 1
