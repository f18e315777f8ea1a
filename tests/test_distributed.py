"""Two ranks on CPU: DeepSpeed ZeRO-2/3 (`deepspeed --num_gpus 2`, DeepSpeed's CPU accelerator) and FSDP
(`torchrun --nproc_per_node 2`, gloo) through the HF Trainer with the visual region.

Each launch checks many things at once (launches dominate the time): per rank, the trainable set, frozen weights
bit-identical, region weights changed and identical across ranks, optimizer state only for region + projector
parameters; then the saved checkpoint reloads with the region recorded.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from vr_plugin import fsdp_config, prune_outside_region, read_pruning, read_region, score_layers
from vr_plugin.tiny import build_model

from .common import LlavaSynthetic, changed, collate, free_port, snapshot

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

pytest.importorskip("deepspeed")
HERE = os.path.join(os.path.dirname(__file__), "distributed")
REGION = ("model.language_model.layers.1.", "model.language_model.layers.7.", "model.multi_modal_projector.")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def _launcher(name):
    return shutil.which(name, path=os.path.dirname(sys.executable)) or name


def _initial(tmp_path):
    model = build_model("llava")
    model.save_pretrained(tmp_path / "init")
    return model


def _run(command, tmp_path):
    run = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    return run, run.stdout + run.stderr


def _launch(tmp_path, stage, mode="region", late=False, steps=2):
    model = _initial(tmp_path)
    command = [
        _launcher("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), os.path.join(HERE, "ds_train.py"),
        "--model_dir", str(tmp_path / "init"), "--result", str(tmp_path / "result"), "--stage", str(stage),
        "--mode", mode, "--late", str(late), "--output_dir", str(tmp_path / "out"), "--max_steps", str(steps),
        "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "steps",
        "--save_steps", str(steps), "--remove_unused_columns", "False", "--learning_rate", "1e-2",
        "--logging_steps", "1", "--warmup_steps", "0",
    ]  # fmt: skip
    run, log = _run(command, tmp_path)
    return model, run, log


def _reports(tmp_path):
    return [json.loads((tmp_path / f"result.{rank}.json").read_text()) for rank in (0, 1)]


def _region_names(model):
    return {n for n, _ in model.named_parameters() if n.startswith(REGION)}


def _check_ranks(reports, initial, expected_changed):
    """What every rank must agree on after training."""
    region = _region_names(initial)
    first = reports[0]
    for report in reports:
        assert report["trainable"] == first["trainable"]  # identical trainable sets
        assert report["changed"] == sorted(expected_changed)  # frozen bit-identical, every trainable tensor moved
        assert report["trained_digest"] == first["trained_digest"]  # region weights identical across ranks
        assert report["frozen_digest"] == first["frozen_digest"]
        assert report["held_is_plan"] and report["held_numel"] == report["plan_trainable"]
        assert report["engine_layers"].endswith("model.language_model.layers")
    # optimizer state: the ranks' fp32 partitions and Adam moments together cover the trainable parameters only
    # (ZeRO pads each partition a little), far fewer than the frozen ones
    trainable = first["plan_trainable"]
    for key in ("fp32", "exp_avg"):
        held = sum(r["optimizer"][key] for r in reports)
        assert trainable <= held < trainable + 64 * len(first["trainable"]), (key, held, trainable)
    assert trainable < first["plan_total"] - trainable
    return region


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_region_training(tmp_path, stage):
    """Train, checkpoint, resume with the same region, refuse another region; ZeRO-3 also scores layers."""
    initial, run, log = _launch(tmp_path, stage)
    assert run.returncode == 0, log[-6000:]
    reports = _reports(tmp_path)
    region = _check_ranks(reports, initial, _region_names(initial))
    expected = sum(p.numel() for n, p in initial.named_parameters() if n in region)
    for report in reports:  # counted with ds_numel under ZeRO-3
        assert report["plan_trainable"] == expected
        assert report["plan_total"] == sum(p.numel() for p in initial.parameters())
        assert report["partitioned"] == (stage == 3)
        assert report["optimizer"]["zero"] == (
            "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
        )
        # resume from checkpoint-2 with the same region: the saved state (log history) loads, one more step runs
        assert report["resumed_step"] == 3 and report["resumed_loss"][:2] == report["loss"]
        assert len(report["resumed_loss"]) == 3
        assert report["resumed_changed"] == sorted(region)
        # another region: refused while the Trainer is built, before DeepSpeed loads anything, naming both
        message = report["other_region_error"]
        assert "Cannot resume from" in message and "checkpoint-3" in message, message
        assert "'uniform_0.25' (layers [1, 7])" in message and "'0,6' (layers [0, 6])" in message, message

    trained = type(initial).from_pretrained(tmp_path / "out" / "final")  # gathered 16-bit weights, all of them
    assert changed(snapshot(initial), trained) == region
    assert read_region(trained).layers == [1, 7]
    assert read_region(tmp_path / "out" / "checkpoint-2").layers == [1, 7]
    if stage == 3:
        _check_zero3_scores_and_prune(tmp_path, reports, initial, trained)


def _check_zero3_scores_and_prune(tmp_path, reports, initial, trained):
    """Scores computed under ZeRO-3 equal those of one process; the ZeRO-3 checkpoint prunes and reloads."""
    batches = [collate([s]) for s in LlavaSynthetic(initial.config, n=2, seed=1)]
    bi_base = score_layers(initial, batches, "bi", progress=False)
    bi_trained = score_layers(trained, batches, "bi", progress=False)
    change = score_layers(trained, metric="weight_change", reference=initial, progress=False)
    for report in reports:
        for key, expected in (("bi_base", bi_base), ("bi_trained", bi_trained), ("weight_change", change)):
            got = {int(k): v for k, v in report[key].items()}
            assert got.keys() == expected.keys()
            assert all(abs(got[i] - expected[i]) < 1e-5 for i in expected), (key, got, expected)
    assert report["base_partitioned"]
    assert {i for i, v in change.items() if v > 0} == {1, 7}

    record = prune_outside_region(trained, remove=2, scores=str(tmp_path / "out" / "scores.0.json"))
    assert not set(record.removed) & {1, 7}  # weight change is zero outside the region: those layers go first
    trained.save_pretrained(tmp_path / "pruned")
    pruned = type(initial).from_pretrained(tmp_path / "pruned")
    assert len(pruned.model.language_model.layers) == 6
    assert read_pruning(pruned).removed == record.removed
    kept = read_pruning(pruned).kept
    assert read_region(pruned).layers == [kept.index(1), kept.index(7)]


def test_zero3_region_lora(tmp_path):
    """LoRA on the region layers under ZeRO-3: only adapters and the projector copy train, the base stays put."""
    initial, run, log = _launch(tmp_path, 3, mode="lora")
    assert run.returncode == 0, log[-6000:]
    reports = _reports(tmp_path)
    trainable = reports[0]["trainable"]
    lora = [n for n in trainable if "lora_" in n]
    assert {n.split("layers.")[1].split(".")[0] for n in lora} == {"1", "7"}
    assert all("vision" not in n for n in lora)
    assert set(trainable) - set(lora) == {n for n in trainable if "multi_modal_projector.modules_to_save" in n}
    lora_b = {n for n in lora if "lora_B" in n}
    _check_ranks(reports, initial, set(trainable))
    assert lora_b and lora_b <= set(reports[0]["changed"])  # B starts at zero, so it moved
    assert reports[0]["plan_before_trainer"] == reports[0]["plan_trainable"]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert read_region(checkpoint).layers == [1, 7]
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(build_model("llava"), checkpoint)
    assert any(p.abs().sum() > 0 for n, p in reloaded.named_parameters() if "lora_B" in n)


def test_late_callback_under_deepspeed_stops_clearly(tmp_path):
    _, run, log = _launch(tmp_path, 2, late=True)
    assert run.returncode != 0
    assert "attached after the Trainer built its optimizer" in log


@pytest.mark.parametrize("version,extra", [(1, []), (2, []), (2, ["--loss_chunk", "4"])], ids=["1", "2", "2-chunked"])
def test_fsdp_region_training(tmp_path, version, extra):
    """FSDP through the HF Trainer and accelerate, one unit per decoder layer, gloo on two CPU ranks; FSDP2 also
    through RegionTrainer with the loss in chunks (lm_head called per chunk, in forward and recompute)."""
    initial = _initial(tmp_path)
    command = [
        _launcher("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
        os.path.join(HERE, "fsdp_train.py"), "--model_dir", str(tmp_path / "init"), "--version", str(version),
        "--result", str(tmp_path / "result"), "--output_dir", str(tmp_path / "out"), *extra,
    ]  # fmt: skip
    run, log = _run(command, tmp_path)
    assert run.returncode == 0, log[-6000:]
    reports = _reports(tmp_path)
    _check_fsdp(reports, initial, version, log)
    if version == 2:  # full state dict gathered on save (FSDP1's gather crashes on CPU/gloo; see fsdp_train.py)
        trained = type(initial).from_pretrained(tmp_path / "out" / "final")
        assert changed(snapshot(initial), trained) == _region_names(initial)
        assert read_region(trained).layers == [1, 7]


def test_fsdp_config_wraps_decoder_layers():
    model = build_model("llava")
    assert fsdp_config(model) == {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
    }
    assert fsdp_config(model, version=1)["use_orig_params"] is True
    with pytest.raises(ValueError, match="use_orig_params=False cannot train a visual region with FSDP1"):
        fsdp_config(model, version=1, use_orig_params=False)
    with pytest.raises(ValueError, match="FSDP version 3 is not supported; use 1 or 2"):
        fsdp_config(model, version=3)


def _check_fsdp(reports, initial, version, log):
    region = _region_names(initial)
    first = reports[0]
    for report in reports:
        assert ("FullyShardedDataParallel" if version == 1 else "FSDPModule") in report["wrapper"]
        assert report["layers_wrapped"]  # one FSDP unit per decoder layer (vr_plugin.fsdp_config)
        assert report["trainable"] == first["trainable"] == sorted(region)
        assert report["changed"] == sorted(region)
        assert report["trained_digest"] == first["trained_digest"]
        assert report["optimizer_names"] == sorted(region)  # the optimizer holds only region + projector tensors
    if version == 1:
        assert all(
            report["use_orig_params"] for report in reports
        )  # asked for use_orig_params=False: switched, with a warning
        assert "setting use_orig_params=True" in log
