"""TRL's SFTTrainer with the visual region (vr_plugin.integrations.trl, recipes/trl/sft_vlm_region.py).

Real TRL (SFTTrainer, its VLM collator, its chat-template processing), real peft, the tiny local Llava with its own
processor and chat template, and image+text records as TRL's VLM example takes them ({"messages", "images"}).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.common import changed, requires_cpu_bnb, snapshot, synthetic_image, torch_threads
from vr_plugin.record import read_region
from vr_plugin.synthetic import COLOURS
from vr_plugin.tiny import save_tiny_lvlm

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from vr_plugin.integrations.trl import RegionSFTTrainer, region_sft_kwargs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "trl", "sft_vlm_region.py")
LAYERS = "model.language_model.layers"
PROJECTOR = "model.multi_modal_projector."
REGION = {"spec": "uniform_0.25", "layers": [1, 7], "num_layers": 8}  # uniform_0.25 of the tiny model's 8 layers
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny tensors on a busy 2-core machine: one thread is several times faster; no hub calls."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with torch_threads(1):
        yield


def records(n: int = 4) -> list:
    """Image+text conversations in TRL's VLM format: an image part in the user turn, PIL images beside."""
    names = list(COLOURS)
    return [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": names[i % len(names)]}]},
            ],
            "images": [synthetic_image(i)],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_lvlm("llava", str(tmp_path_factory.mktemp("trl") / "llava"))


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(records())


def sft_args(out, **overrides) -> SFTConfig:
    options = dict(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, save_strategy="no",
        report_to=[], use_cpu=True, max_length=None, logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    return SFTConfig(**{**options, **overrides})


def region_names(names, layers=(1, 7)) -> set:
    return {n for n in names if n.startswith(tuple(f"{LAYERS}.{i}." for i in layers))}


def test_full_parameter_region_with_plain_sft_trainer(model_dir, dataset, tmp_path):
    """region_sft_kwargs in TRL's own SFTTrainer: exactly region + projector train, the rest stays bit-identical,
    and the saved model (config.json) records the region and reloads to the trained weights."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    names = [n for n, _ in model.named_parameters()]
    expected = region_names(names) | {n for n in names if n.startswith(PROJECTOR)}
    before = snapshot(model)
    trainer = SFTTrainer(
        model=model,
        args=sft_args(tmp_path / "out"),
        train_dataset=dataset,
        processing_class=processor,
        **region_sft_kwargs(model, "uniform_0.25"),
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    trainer.train()
    assert changed(before, model) == expected  # every trained tensor moved, every frozen one (vision tower too) not
    trainer.save_model(str(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json", encoding="utf-8") as handle:
        assert json.load(handle)["visual_region"] == REGION
    with open(tmp_path / "out" / "region_plan.json", encoding="utf-8") as handle:
        assert set(json.load(handle)["trainable_names"]) == expected
    reloaded = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out"))
    assert changed(snapshot(model), reloaded) == set()
    assert read_region(reloaded).layers == REGION["layers"]


def test_region_lora_with_projector_lr(model_dir, dataset, tmp_path):
    """RegionSFTTrainer + region_sft_kwargs(lora=True): adapters only in the region layers, the projector's
    full-precision copy trains at projector_lr, every base weight stays bit-identical, the adapter directory
    records the region."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    kwargs = region_sft_kwargs(model, "uniform_0.25", lora=True, r=4, lora_alpha=8)
    base = snapshot(model)
    linears = {f"base_model.model.{n}" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    trainer = RegionSFTTrainer(
        model=model, args=sft_args(tmp_path / "out"), train_dataset=dataset, processing_class=processor,
        projector_lr=1e-4, **kwargs,
    )  # fmt: skip
    peft_model = trainer.model
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert adapted == {n for n in linears if n.startswith(tuple(f"base_model.model.{LAYERS}.{i}." for i in (1, 7)))}
    copies = {n for n, _ in peft_model.named_parameters() if "multi_modal_projector.modules_to_save." in n}
    lora = {n for n, _ in peft_model.named_parameters() if ".lora_" in n}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(copies) == 4 and len(lora) == 2 * len(adapted) == 28 and trainable == lora | copies

    before = snapshot(peft_model)
    trainer.train()
    assert changed(before, peft_model) == trainable
    assert {n for n, p in model.named_parameters() if n in base and not torch.equal(base[n], p)} == set()
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert {name: group["initial_lr"] for name, group in groups.items()} == {"projector": 1e-4, "main": 1e-3}
    by_id = {id(p): n for n, p in peft_model.named_parameters()}
    assert {by_id[id(p)] for p in groups["projector"]["params"]} == copies

    trainer.save_model(str(tmp_path / "out"))
    assert read_region(str(tmp_path / "out")).__dict__ == REGION  # visual_region.json beside the adapter
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    lora_keys = [k for k in saved if ".lora_" in k]
    assert lora_keys and all(k.startswith(tuple(f"base_model.model.{LAYERS}.{i}." for i in (1, 7))) for k in lora_keys)


def test_lora_options_need_lora(model_dir):
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"LoRA options \['r'\] were given with lora=False"):
        region_sft_kwargs(model, "uniform_0.25", r=8)


def load_recipe():
    spec = importlib.util.spec_from_file_location("sft_vlm_region", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("region", ["uniform_2.0", "1,9", "centre_0.25"])
def test_recipe_rejects_a_bad_region_before_weights_load(region, model_dir, tmp_path, capsys):
    """A config-only model directory: any attempt to load weights would fail otherwise than with this message."""
    bare = tmp_path / "config_only"
    bare.mkdir()
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as src:
        (bare / "config.json").write_text(src.read())
    argv = ["--model_name_or_path", str(bare), "--dataset_name", str(tmp_path / "none"), "--output_dir",
            str(tmp_path / "out"), "--use_cpu", "--visual_region", region]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        load_recipe().main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --visual_region:" in error and repr(region) in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_recipe_end_to_end(model_dir, tmp_path):
    """recipes/trl/sft_vlm_region.py as a user runs it, on a local dataset directory as load_dataset reads it:
    two steps with a projector learning rate; the saved model differs from the input exactly in region + projector."""
    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_list(records()).to_parquet(str(data / "train.parquet"))
    out = tmp_path / "out"
    argv = [sys.executable, RECIPE, "--model_name_or_path", model_dir, "--dataset_name", str(data),
            "--output_dir", str(out), "--visual_region", "uniform_0.25", "--projector_lr", "1e-4",
            "--learning_rate", "1e-3", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]  # fmt: skip
    env = dict(ENV, PYTHONPATH=ROOT, HF_DATASETS_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(argv, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "visual region 'uniform_0.25': 2/8 layers [1,7]" in result.stderr
    assert read_region(str(out)).__dict__ == REGION
    start = snapshot(AutoModelForImageTextToText.from_pretrained(model_dir))
    moved = changed(start, AutoModelForImageTextToText.from_pretrained(str(out)))
    assert moved == region_names(start) | {k for k in start if k.startswith(PROJECTOR)}
    with open(out / "region_plan.json", encoding="utf-8") as handle:
        assert set(json.load(handle)["trainable_names"]) == moved
    assert os.path.isfile(out / "processor_config.json") or os.path.isfile(out / "preprocessor_config.json")


@requires_cpu_bnb
def test_recipe_qlora(model_dir, tmp_path, monkeypatch):
    """--use_peft --load_in_4bit through the recipe's main (in-process): adapters on the asked kinds of the region
    layers only, the projector's full-precision copy trains, the adapter directory records the region."""
    import datasets

    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_list(records()).to_parquet(str(data / "train.parquet"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    load_recipe().main(
        ["--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir", str(out), "--use_cpu",
         "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
         "--disable_tqdm", "true", "--bf16", "false", "--dtype", "bfloat16", "--use_peft", "--load_in_4bit",
         "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj", "--projector_lr", "1e-4"]
    )  # fmt: skip
    with open(out / "region_plan.json", encoding="utf-8") as handle:
        trained = set(json.load(handle)["trainable_names"])
    lora = {f"base_model.model.{LAYERS}.{i}.self_attn.{kind}.lora_{ab}.default.weight"
            for i in (1, 7) for kind in ("q_proj", "v_proj") for ab in "AB"}  # fmt: skip
    projector = {n for n in trained if n.startswith(f"base_model.model.{PROJECTOR}modules_to_save.default.")}
    assert len(projector) == 4 and trained == lora | projector
    assert read_region(str(out)).__dict__ == REGION
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert {k.replace(".weight", ".default.weight") for k in saved if ".lora_" in k} == lora
