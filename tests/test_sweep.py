"""`vr-plugin sweep` on a tiny local Llava: the results file, exactly the selected layers trained per strategy,
identical numbers for the same seed, resuming a stopped sweep, and refusing changed settings."""

import json
import os

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vr_plugin import read_region, select_layers
from vr_plugin.cli import main
from vr_plugin.outputs import COMPLETE, INCOMPLETE
from vr_plugin.sweep import SWEEP_FILE, rank_runs, recommendation_line, run_name
from vr_plugin.synthetic import make_vqa_dataset
from vr_plugin.tiny import save_tiny_lvlm

pytestmark = pytest.mark.slow

LAYERS = "model.language_model.layers"
PROJECTOR = "model.multi_modal_projector."
STRATEGIES = ["uniform_0.25", "0:2"]  # layers 1,7 and the first quarter (0,1) of the 8-layer model
TIMES = {"train_seconds", "eval_seconds", "finished"}  # what may differ between two identical runs

try:
    import matplotlib  # noqa: F401

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = save_tiny_lvlm("llava", str(root / "model"))
    return model, make_vqa_dataset(str(root / "vqa"), n_train=12, n_test=6)


def command(inputs, out, strategies, *extra):
    """The argv of ``vr-plugin sweep`` on the tiny model: 2 steps per run, seed 0."""
    model, data = inputs
    argv = [
        "sweep", "--model", model, "--data", data["train"], "--images", data["images"], "--eval_data", data["test"],
        "--output", out, "--strategies", *strategies, "--max_new_tokens", 4, "--no_progress",
        "--max_steps", 2, "--per_device_train_batch_size", 4, "--learning_rate", 1e-2, "--save_strategy", "no",
        "--seed", 0, "--disable_tqdm", "true", *extra,
    ]  # fmt: skip
    return [str(a) for a in argv]


def sweep(capsys, inputs, out, strategies, *extra):
    """Run ``vr-plugin sweep`` in-process: (exit status, stdout, stderr)."""
    code = main(command(inputs, out, strategies, *extra))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def first(inputs, tmp_path_factory):
    """One sweep over both strategies, run once for the module."""
    out = tmp_path_factory.mktemp("first") / "sweep"
    assert main(command(inputs, out, STRATEGIES)) == 0
    return out, json.loads((out / SWEEP_FILE).read_text())


def test_results_file_and_report(first):
    out, results = first
    assert results["format"] == "vr-plugin sweep" and results["version"] == 1 and results["num_layers"] == 8
    assert results["strategies"] == STRATEGIES
    assert set(results["settings"]) == {"train", "training_arguments", "eval"}
    assert results["settings"]["training_arguments"] == {
        "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.01, "save_strategy": "no", "seed": 0,
        "disable_tqdm": True,
    }  # fmt: skip
    assert "visual_region" not in results["settings"]["train"] and results["settings"]["eval"]["accuracy"] is True
    assert [run["strategy"] for run in results["runs"]] == STRATEGIES
    for run in results["runs"]:
        assert run["run_dir"] == os.path.join("runs", run_name(run["strategy"]))
        assert (out / run["run_dir"] / COMPLETE).is_file() and not (out / run["run_dir"] / INCOMPLETE).exists()
        assert run["steps"] == 2 and run["eval_records"] == 6 and run["eval_tokens"] > 0
        assert run["eval_loss"] > 0 and 0 <= run["accuracy"] <= 1 and run["correct"] == round(6 * run["accuracy"])
        assert run["trainable_share"] == run["trainable"] / run["total"]
        predictions = json.loads((out / run["run_dir"] / "eval_predictions.json").read_text())
        assert predictions["accuracy"] == run["accuracy"] and predictions["total"] == 6
    assert (out / COMPLETE).is_file() and not (out / INCOMPLETE).exists()
    # the report ranks by eval loss and ends with the recommendation computed from the recorded runs
    ranked, recommended = rank_runs(results["runs"])
    assert [r["eval_loss"] for r in ranked] == sorted(r["eval_loss"] for r in results["runs"])
    report = (out / "report.md").read_text().strip().splitlines()
    assert report[-1] == recommendation_line(recommended)
    assert report[-1].startswith(f"train this region: {recommended['strategy']} (layers ")
    rows = [line for line in report if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[1].strip("`") for row in rows] == [r["strategy"] for r in ranked]
    for row, run in zip(rows, ranked):
        assert f"| {run['eval_loss']:.4f} | {100 * run['accuracy']:.1f}% |" in row
        assert f"| {100 * run['trainable_share']:.2f}% |" in row
    if HAS_MATPLOTLIB:
        assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![sweep](sweep.png)" in report


def weights(path):
    return {n: p.detach().clone() for n, p in AutoModelForImageTextToText.from_pretrained(path).named_parameters()}


def test_every_run_trained_exactly_its_layers(first, inputs):
    out, results = first
    base = weights(inputs[0])
    for run in results["runs"]:
        layers = select_layers(run["strategy"], 8)
        assert run["layers"] == layers
        run_dir = out / run["run_dir"]
        plan = json.loads((run_dir / "region_plan.json").read_text())
        assert plan["spec"] == run["strategy"] and plan["layers"] == layers
        assert read_region(str(run_dir)).layers == layers
        expected = {n for n in base if n.startswith((*(f"{LAYERS}.{i}." for i in layers), PROJECTOR))}
        assert set(plan["trainable_names"]) == expected
        trained = weights(str(run_dir))
        assert {n for n in base if not torch.equal(base[n], trained[n])} == expected  # the rest bit-identical


def test_same_seed_same_numbers_and_a_stopped_sweep_resumes(first, inputs, capsys, tmp_path):
    out = tmp_path / "sweep"
    code, stdout, err = sweep(capsys, inputs, out, STRATEGIES[:1])
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == "train this region: uniform_0.25 (layers 1,7)"
    done = out / "runs" / run_name(STRATEGIES[0]) / "model.safetensors"
    stamp = done.stat().st_mtime_ns
    # the second strategy's run was killed half way: its folder is unfinished and gets trained again
    killed = out / "runs" / run_name(STRATEGIES[1])
    killed.mkdir()
    (killed / INCOMPLETE).write_text("{}")
    (killed / "model.safetensors").write_bytes(b"half")
    code, _, err = sweep(capsys, inputs, out, STRATEGIES)
    assert code == 0, err
    assert done.stat().st_mtime_ns == stamp  # the finished run was not trained again
    assert (killed / COMPLETE).is_file() and not (killed / INCOMPLETE).exists()
    again = json.loads((out / SWEEP_FILE).read_text())
    _, results = first
    assert again["settings"] == results["settings"]
    strip = [{k: v for k, v in run.items() if k not in TIMES} for run in results["runs"]]
    assert [{k: v for k, v in run.items() if k not in TIMES} for run in again["runs"]] == strip  # bit-identical
    assert (out / "report.md").read_text().splitlines()[-1] == (first[0] / "report.md").read_text().splitlines()[-1]


def test_changed_settings_and_bad_inputs_are_refused(first, inputs, capsys, tmp_path):
    out, _ = first
    before = (out / SWEEP_FILE).read_text()

    def refused(directory, *extra, strategies=STRATEGIES):
        code, _, err = sweep(capsys, inputs, directory, strategies, *extra)
        lines = [line for line in err.splitlines() if line.startswith("vr-plugin ")]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("vr-plugin sweep: error: "), err
        return lines[0]

    line = refused(out, "--learning_rate", 5e-3)
    assert "holds results of other settings (--learning_rate 0.01 -> 0.005)" in line
    assert "--overwrite_output_dir to start over" in line
    assert "--lora False -> True" in refused(out, "--lora")
    assert (out / SWEEP_FILE).read_text() == before  # nothing written
    assert "--strategies: " in refused(tmp_path / "new", strategies=["uniform_9"]) and not (tmp_path / "new").exists()
    assert "--eval_data" in refused(tmp_path / "new", "--eval_data", tmp_path / "missing.json")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert "is not empty (it holds notes.txt)" in refused(other)
    assert "does not apply to a sweep" in refused(tmp_path / "new", "--resume_from_checkpoint", other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_eval_loss_is_the_mean_over_answer_tokens(first, inputs):
    """The recorded eval loss is reproduced from the saved model, and batching (padding) does not change it."""
    from vr_plugin.data import validate_conversations
    from vr_plugin.sweep import eval_loss
    from vr_plugin.training import load_model

    out, results = first
    data = inputs[1]
    records, _ = validate_conversations(data["test"], data["images"])
    run = results["runs"][0]
    model, processor = load_model(str(out / run["run_dir"]), device="cpu")
    assert eval_loss(model, processor, records, data["images"], batch_size=8) == (run["eval_loss"], run["eval_tokens"])
    one_by_one, tokens = eval_loss(model, processor, records, data["images"], batch_size=1)
    assert tokens == run["eval_tokens"] and one_by_one == pytest.approx(run["eval_loss"], rel=1e-5)


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and "--strategies SPEC [SPEC ...]" in help_text and "--eval_data" in help_text
    assert "--visual_region" not in help_text  # the strategies replace it
