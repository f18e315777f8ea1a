"""`vr-plugin study --quick`: the whole pipeline through the real CLI, its results file, the layers each strategy
trained, retention against the base, and the same numbers for the same seed (also when the seeds run in parallel)."""

import json
import math
import os

import pytest
import torch

from vr_plugin.cli import main
from vr_plugin.evaluate import evaluate
from vr_plugin.spec import select_layers
from vr_plugin.study import StudyConfig, mean_ci, plan_strategies, t_quantile
from vr_plugin.training import load_model

pytestmark = pytest.mark.slow

HAS_MATPLOTLIB = True
try:
    import matplotlib  # noqa: F401
except ImportError:
    HAS_MATPLOTLIB = False

QUICK = StudyConfig.quick()
SEEDS = [QUICK.seed + i for i in range(QUICK.seeds)]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "study"
    assert main(["study", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_file_structure(study):
    out, results = study
    assert results["config"] == json.loads(json.dumps(vars(QUICK)))
    names = [s.name for s in plan_strategies(QUICK)]
    assert [s["name"] for s in results["strategies"]] == names
    assert len(names) == len(set(names)) == 17
    assert sorted((r["seed"], r["strategy"]) for r in results["runs"]) == sorted((s, n) for s in SEEDS for n in names)
    assert [b["seed"] for b in results["bases"]] == SEEDS
    assert [row["strategy"] for row in results["summary"]] == names + ["random (pooled)"]
    assert sorted(row["rank"] for row in results["summary"]) == list(range(1, len(names) + 2))
    for row in results["summary"]:
        assert row["visual_accuracy"]["n"] == len(SEEDS)
        for key in ("visual_accuracy_vs_full", "retention_vs_full", "pruned_visual_accuracy_vs_full"):
            assert set(row[key]) >= {"mean", "ci", "sd", "n", "separated"}
    for seed in SEEDS:  # every seed's runs also on their own, as written when the seed finished
        per_seed = json.loads((out / "runs" / f"seed{seed}.json").read_text())
        assert per_seed["runs"] == [r for r in results["runs"] if r["seed"] == seed]
    assert (out / "report.md").is_file() and (out / "vr_complete.json").is_file()
    assert not (out / ".vr_incomplete").exists()
    if HAS_MATPLOTLIB:
        for picture in ("strategies.png", "ratio.png"):
            assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_strategy_trained_exactly_its_layers(study):
    out, results = study
    depth = QUICK.num_layers
    fixed = {s.name: s.spec for s in plan_strategies(QUICK) if s.spec is not None}
    for run in results["runs"]:
        if run["strategy"] in fixed:
            assert run["spec"] == fixed[run["strategy"]]
        else:  # post-hoc: an explicit index list, the top-k of the seed's full-tuning run by that score
            full = next(r for r in results["runs"] if r["seed"] == run["seed"] and r["strategy"] == "all")
            scores = {int(i): s for i, s in full["posthoc_scores"][run["strategy"]].items()}
            k = len(select_layers("uniform_0.25", depth))
            assert run["spec"] == ",".join(map(str, sorted(sorted(scores, key=lambda i: (-scores[i], i))[:k])))
        layers = select_layers(run["spec"], depth)
        assert run["layers"] == run["trainable_layers"] == run["changed_layers"] == layers, run["strategy"]
        assert run["changed_groups"] == ["projector"]  # nothing else moved: embeddings, norm, lm_head, vision frozen
        folder = run["strategy"].replace(":", "-").replace(",", "_")
        plan = json.loads((out / "models" / f"seed{run['seed']}" / "runs" / folder / "region_plan.json").read_text())
        assert plan["layers"] == layers and plan["spec"] == run["spec"]
        assert math.isclose(run["trainable_share"], plan["trainable"] / plan["total"])
        outside = depth - len(layers)
        expected = QUICK.remove if run["strategy"] == "all" else min(QUICK.remove, outside)
        assert len(run["pruned"]["removed"]) == expected and run["pruned"]["kept"] == depth - expected
        if run["strategy"] != "all":
            assert not set(run["pruned"]["removed"]) & set(layers)  # pruned outside the region only
    shares = {r["strategy"]: r["trainable_share"] for r in results["runs"] if r["seed"] == SEEDS[0]}
    assert shares["none"] < shares["uniform_0.125"] < shares["uniform_0.25"] < shares["uniform_0.5"] < shares["all"]


def test_retention_is_measured_against_the_base(study):
    out, results = study
    for base in results["bases"]:
        assert base["text_accuracy"] > 0  # the quick base knows some of its text task
        model, processor = load_model(str(out / "models" / f"seed{base['seed']}" / "base"), device="cpu")
        text_test = str(out / "data" / "text_test.json")
        text = evaluate(model, processor, text_test, None, batch_size=100, max_new_tokens=4, progress=False)
        assert text.accuracy == base["text_accuracy"]  # the saved base, evaluated again, gives the recorded number
        for run in (r for r in results["runs"] if r["seed"] == base["seed"]):
            assert run["retention"] == run["text_accuracy"] / base["text_accuracy"]
            assert run["pruned"]["retention"] == run["pruned"]["text_accuracy"] / base["text_accuracy"]
        none = next(r for r in results["runs"] if r["seed"] == base["seed"] and r["strategy"] == "none")
        assert none["text_accuracy"] == base["text_accuracy"] and none["retention"] == 1.0  # the LLM is the base's
    row = next(r for r in results["summary"] if r["strategy"] == "none")
    assert row["retention"]["mean"] == 1.0 and row["retention"]["ci"] == 0.0


def _numbers(value):
    """``value`` without its timings (seconds, dates, the machine's load, the command line)."""
    if isinstance(value, dict):
        skip = ("machine", "date", "command")
        return {k: _numbers(v) for k, v in value.items() if k not in skip and "seconds" not in k}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def test_same_seed_same_numbers_also_in_parallel(study, tmp_path):
    out, results = study
    again = tmp_path / "again"
    assert main(["study", "--quick", "--jobs", "2", "--out", str(again)]) == 0
    second = json.loads((again / "results.json").read_text())
    assert second["config"]["jobs"] == 2
    first, second = _numbers(results), _numbers(second)
    first["config"].pop("jobs"), second["config"].pop("jobs")
    assert first == second


def test_refuses_to_overwrite_and_bad_sizes(tmp_path, capsys):
    held = tmp_path / "held"
    held.mkdir()
    (held / "keep.txt").write_text("mine")
    assert main(["study", "--quick", "--out", str(held)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite_output_dir" in err and len(err.strip().splitlines()) == 1
    assert (held / "keep.txt").read_text() == "mine" and os.listdir(held) == ["keep.txt"]
    assert main(["study", "--quick", "--seeds", "1", "--out", str(tmp_path / "x")]) == 2
    assert (
        capsys.readouterr().err.strip() == "vr-plugin study: error: study seeds must be >= 2 for a 95% interval, got 1"
    )
    assert not (tmp_path / "x").exists()


def test_t_quantiles_and_intervals():
    assert t_quantile(1) == 12.7062 and t_quantile(4) == 2.7764 and t_quantile(30) == 2.0423
    for df, value in ((40, 2.0211), (60, 2.0003), (120, 1.9799), (1000, 1.9623)):  # published 0.975 quantiles
        assert abs(t_quantile(df) - value) < 2e-4
    stats = mean_ci([0.5, 0.7, 0.6, 0.8, 0.4])
    sd = torch.tensor([0.5, 0.7, 0.6, 0.8, 0.4], dtype=torch.float64).std().item()
    assert math.isclose(stats["mean"], 0.6) and math.isclose(stats["sd"], sd)
    assert math.isclose(stats["ci"], 2.7764 * sd / math.sqrt(5))
    assert mean_ci([0.3])["ci"] is None
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0)
