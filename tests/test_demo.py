"""`vr-plugin demo`, reduced (--quick): every stage runs, the headline comparison is over 3 seeds with its spread,
the report holds what was measured, the models reload."""

import json
import os
import re
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vr_plugin import read_pruning, read_region
from vr_plugin.cli import main
from vr_plugin.demo import DemoConfig, _plots, answer_prior

SEEDS = [0, 1, 2]

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
    assert results["seeds"] == SEEDS and DemoConfig.quick().seeds == 3
    assert (out / "eval" / "base.json").is_file()
    for name in ("region", "full"):
        for seed in SEEDS:
            assert (out / "eval" / f"{_model(name, seed)}.json").is_file()
            assert (out / "eval" / f"{_model(name, seed)}-pruned.json").is_file()
    assert results["config"] == {**vars(DemoConfig.quick())}


def _model(kind, seed):
    """The demo's name of a model: ``region`` for the first seed, ``region-seed1`` for the next, ..."""
    return kind if seed == SEEDS[0] else f"{kind}-seed{seed}"


def _eval_names(row):
    """The eval files a row of the table averages: the base model, or one model per seed."""
    if row["kind"] == "base":
        return ["base"]
    kind, _, pruned = row["kind"].partition("-")
    return [_model(kind, seed) + (f"-{pruned}" if pruned else "") for seed in SEEDS]


def test_report_table_is_the_measured_numbers(demo):
    out, results = demo
    report = (out / "report.md").read_text()
    rows = results["rows"]
    assert [r["layers"] for r in rows] == ["8/8", "8/8", "8/8", "6/8", "6/8"]
    base, full, region, region_pruned, full_pruned = rows
    assert region["share"] < full["share"] < 1  # the region trains fewer parameters; the vision tower never trains
    for row in rows:
        accuracies = [json.loads((out / "eval" / f"{name}.json").read_text())["accuracy"] for name in _eval_names(row)]
        assert row["accuracies"] == accuracies and row["accuracy"] == sum(accuracies) / len(accuracies)
        assert (row["min"], row["max"]) == (min(accuracies), max(accuracies))
        line = next(line for line in report.splitlines() if line.startswith(f"| {row['run']} |"))
        assert f"| {100 * row['accuracy']:.1f}% |" in line
        if row["kind"] != "base":  # the spread over the seeds, and every seed's accuracy
            assert f"| {100 * min(accuracies):.1f}–{100 * max(accuracies):.1f}% |" in line
            per_seed = [entry for entry in report.splitlines() if entry.startswith(f"| {row['run']} |")][1]
            assert per_seed == f"| {row['run']} | " + " | ".join(f"{100 * a:.1f}%" for a in accuracies) + " |"
        if row["seconds"] is not None:
            assert f"| {row['seconds']:.1f} s | {row['cpu_seconds']:.1f} s |" in line
            assert f"| {100 * row['share']:.1f}% |" in line
    assert f"took **{results['seconds']:.0f} s**" in report
    assert f"{100 * results['answer_prior']:.1f}%" in report
    # the scores in the report are those in scores/
    scores = json.loads((out / "scores" / "region.json").read_text())["scores"]
    for layer, score in scores.items():
        assert re.search(rf"^\| {layer} \| (yes)? \| {float(score):.4f} \|", report, re.M)


def test_models_reload_with_region_and_pruning_records(demo):
    out, results = demo
    models = out / "models"
    for seed in SEEDS:
        region, full = _model("region", seed), _model("full", seed)
        assert read_region(str(models / region)).layers == [1, 7]
        assert read_region(str(models / full)).layers == list(range(8))
        record = read_pruning(str(models / f"{region}-pruned"))
        assert len(record.removed) == 2 and not set(record.removed) & {1, 7}  # only layers outside the region
        assert read_region(str(models / f"{region}-pruned")).layers == [record.kept.index(1), record.kept.index(7)]
    assert results["rows"][3]["removed"] == [read_pruning(str(models / f"{_model('region', s)}-pruned")).removed
                                             for s in SEEDS]  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(models / "region-pruned")
    assert len(model.model.language_model.layers) == 6


def test_the_seeds_are_different_runs(demo):
    """Each seed trains from the same base model with its own data order: the trained weights differ."""
    out, _ = demo
    first, second = (
        dict(AutoModelForImageTextToText.from_pretrained(out / "models" / _model("region", s)).named_parameters())
        for s in SEEDS[:2]
    )
    projector = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(first[projector], second[projector])
    frozen = "model.language_model.layers.0.self_attn.q_proj.weight"  # outside the region: the base's, in both
    assert torch.equal(first[frozen], second[frozen])


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
