"""DeepSpeed ZeRO-2/3 with 2 ranks on the CPU accelerator: the region is frozen before the engine exists."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vr_plugin.tiny import build_model

from .common import changed, snapshot

pytest.importorskip("deepspeed")
SCRIPT = os.path.join(os.path.dirname(__file__), "distributed", "ds_train.py")
REGION = ("model.language_model.layers.1.", "model.language_model.layers.7.", "model.multi_modal_projector.")


def _launch(tmp_path, stage, late=False, port=29600):
    model_dir = tmp_path / "init"
    model = build_model("llava")
    model.save_pretrained(model_dir)
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    command = [
        launcher, "--num_gpus", "2", "--master_port", str(port), SCRIPT,
        "--model_dir", str(model_dir), "--result", str(tmp_path / "result"), "--stage", str(stage),
        "--late", str(late), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
        "--remove_unused_columns", "False", "--learning_rate", "1e-2",
    ]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return model, run


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_region_training(tmp_path, stage):
    initial, run = _launch(tmp_path, stage, port=29600 + stage)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reports = [json.loads((tmp_path / f"result.{rank}.json").read_text()) for rank in (0, 1)]
    expected = sum(p.numel() for n, p in initial.named_parameters() if n.startswith(REGION))
    for report in reports:  # counted with ds_numel on every rank, optimizer == plan
        assert report["plan_trainable"] == report["held_numel"] == expected
        assert report["plan_total"] == sum(p.numel() for p in initial.parameters())
        assert report["held_is_plan"]
        assert report["engine_layers"] == "module.model.language_model.layers"
    trained = type(initial).from_pretrained(tmp_path / "out" / "final")
    before = snapshot(initial)
    assert changed(before, trained) == {n for n, _ in initial.named_parameters() if n.startswith(REGION)}
    assert trained.config.visual_region["layers"] == [1, 7]
    assert torch.is_tensor(next(trained.parameters()))


def test_late_callback_under_deepspeed_stops_clearly(tmp_path):
    _, run = _launch(tmp_path, 2, late=True, port=29610)
    assert run.returncode != 0
    assert "attached after the Trainer built its optimizer" in run.stdout + run.stderr
