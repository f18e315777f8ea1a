"""Resume keeps the trained weights: SIGKILL mid-training, resume, and the result is bit-identical to an
uninterrupted run; a checkpoint whose weights do not come back stops the run, naming what did not load."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vr_plugin.resume import ResumeError
from vr_plugin.synthetic import make_vqa_dataset
from vr_plugin.tiny import available, save_tiny_lvlm

from .common import LlavaSynthetic, collate, freeze_vision, requires_cpu_bnb, torch_threads
from .test_cli import ROOT, cli, fails

pytestmark = pytest.mark.slow

KILL = os.path.join(ROOT, "tests", "scripts", "kill_after_checkpoint.py")
MODES = {"full": [], "lora": ["--lora"], "hybrid": ["--quantize_frozen", "nf4"], "qlora": ["--lora", "--bits", "4"]}
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors", "hybrid": "model.safetensors",
           "qlora": "adapter_model.safetensors"}  # fmt: skip
CASES = [("llava", "full"), ("llava", "lora"), ("qwen2_vl", "full"), ("qwen2_vl", "lora")]
CASES = [pytest.param(a, m, id=f"{a}-{m}", marks=pytest.mark.skipif(not available(a), reason="no such model"))
         for a, m in CASES]  # fmt: skip
BNB = [pytest.param("llava", m, id=f"llava-{m}", marks=requires_cpu_bnb) for m in ("hybrid", "qlora")]


@pytest.fixture(autouse=True)
def one_thread():
    """The killed run is a subprocess with one thread; the in-process runs use one too (sums over threads round
    differently, and resumed must equal uninterrupted to the bit)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vqa_dataset(str(tmp_path_factory.mktemp("vqa")), n_train=12, n_test=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = save_tiny_lvlm(arch, str(tmp_path_factory.mktemp(arch) / "model"))
        return made[arch]

    return get


def _args(model, data, mode, out):
    return [
        "train", "--model", model, "--data", data["train"], "--images", data["images"], "--output", out,
        "--max_steps", 4, "--save_steps", 2, "--per_device_train_batch_size", 2, "--learning_rate", 1e-2,
        "--seed", 0, "--logging_steps", 1, *MODES[mode],
    ]  # fmt: skip


@pytest.mark.parametrize("arch, mode", CASES + BNB)
def test_sigkill_then_resume_equals_uninterrupted(capsys, tmp_path, models, data, arch, mode):
    model = models(arch)
    code, _, err = cli(capsys, *_args(model, data, mode, tmp_path / "straight"))
    assert code == 0, err
    crashed = tmp_path / "crashed"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, KILL, "2", *map(str, _args(model, data, mode, crashed))], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert (crashed / "checkpoint-2").is_dir() and not (crashed / "checkpoint-4").exists()
    args = _args(model, data, mode, crashed) + ["--resume_from_checkpoint", crashed / "checkpoint-2"]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    straight, resumed = load_file(tmp_path / "straight" / WEIGHTS[mode]), load_file(crashed / WEIGHTS[mode])
    assert straight.keys() == resumed.keys()
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []


def _plain_trainer(out, model, max_steps, trainer_cls=None, **kwargs):
    from transformers import Trainer, TrainingArguments

    from vr_plugin import RegionFreezeCallback

    args = TrainingArguments(str(out), max_steps=max_steps, save_steps=2, report_to=[], use_cpu=True,
                             per_device_train_batch_size=2, learning_rate=1e-2, seed=0, **kwargs)  # fmt: skip
    callbacks = [RegionFreezeCallback("uniform_0.25")]
    dataset = LlavaSynthetic(model.config, n=8)
    return (trainer_cls or Trainer)(model=model, args=args, train_dataset=dataset, data_collator=collate,
                                    callbacks=callbacks)  # fmt: skip


def _tiny_llava():
    from vr_plugin.tiny import build_model

    model = build_model("llava")
    freeze_vision(model)
    return model


def test_plain_trainer_resume_that_loses_the_weights_is_stopped(tmp_path):
    """transformers 5's Trainer saves the original key layout and resumes with strict=False under the runtime names:
    the weights do not come back. RegionFreezeCallback stops the run instead of training on from the base."""
    _plain_trainer(tmp_path, _tiny_llava(), 2).train()
    resumed = _plain_trainer(tmp_path, _tiny_llava(), 4)
    lost = r"did not restore 22 of 22 trained parameters, e.g. model.multi_modal_projector.linear_1.weight \(saved as"
    with pytest.raises(ResumeError, match=lost):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_region_trainer_refuses_a_checkpoint_it_cannot_load(tmp_path):
    from vr_plugin import RegionTrainer

    _plain_trainer(tmp_path, _tiny_llava(), 2).train()  # original-layout keys
    trainer = _plain_trainer(tmp_path / "again", _tiny_llava(), 4, trainer_cls=RegionTrainer)
    with pytest.raises(ResumeError, match=r"do not match the model: \d+ missing keys \['model\..*unexpected keys"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_cli_resume_from_a_foreign_checkpoint_is_one_line(capsys, tmp_path, models, data):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(models("llava"))
    model.save_pretrained(tmp_path / "foreign" / "checkpoint-2")  # weights only, original layout, no trainer state
    args = _args(models("llava"), data, "full", tmp_path / "out")
    fails(capsys, *args, "--resume_from_checkpoint", tmp_path / "foreign" / "checkpoint-2",
          match="do not match the model")  # fmt: skip
