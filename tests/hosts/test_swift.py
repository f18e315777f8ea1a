"""ms-swift 4.6 (``swift sft``) with the visual region: the real CLI on the tiny Llava, checkpoints compared with the
base tensor by tensor.  Runs only in the ``swift`` stack (tests/hosts/stack_swift.py)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from ..stacks import OFFLINE_ENV, current

pytestmark = [
    pytest.mark.stack,
    pytest.mark.slow,
    pytest.mark.skipif(current() != "swift", reason="runs in the ms-swift stack (VR_STACK=swift)"),
]

SPEC = "uniform_0.25"
REGION = [1, 7]  # uniform_0.25 of 8 layers
LINEAR_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
OFFLINE = {"USE_HF": "1", **OFFLINE_ENV}
_LLM_LAYER = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")


def swift_flags(model: str, data: str, output: str, tuner: str) -> list:
    """The ``swift sft`` flags of a 2-step CPU run (hosts.md), one checkpoint at step 2."""
    return [
        *("--model", model, "--model_type", "llava1_5_hf", "--dataset", data, "--tuner_type", tuner),
        *("--use_cpu", "true", "--torch_dtype", "float32", "--check_model", "false", "--report_to", "none"),
        *("--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--save_only_model", "true"),
        *("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3"),
        *("--dataloader_num_workers", "0", "--output_dir", output),
    ]


def run(command: list, env: dict = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **OFFLINE, **(env or {}))
    environment.pop("PYTHONPATH", None)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def launcher(*args: str) -> list:
    return [sys.executable, "-m", "vr_plugin.integrations.swift", "sft", *args]


def checkpoint(output: str) -> str:
    (found,) = glob.glob(os.path.join(output, "v*-*", "checkpoint-2"))
    return found


def kind(key: str) -> tuple:
    """``("layer", index)``, ``("vision", None)``, ``("projector", None)`` or ``("other", None)`` of a tensor name."""
    if "vision_tower" in key:
        return "vision", None
    if "multi_modal_projector" in key:
        return "projector", None
    match = _LLM_LAYER.search(key)
    return ("layer", int(match.group(1))) if match else ("other", None)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from .swift_fixtures import swift_dataset, tiny_llava

    root = tmp_path_factory.mktemp("swift")
    model = tiny_llava(str(root / "model"))
    config_only = root / "config_only"  # no weights at all: what fails here failed before any weights load
    config_only.mkdir()
    shutil.copy(os.path.join(model, "config.json"), config_only / "config.json")
    return {"root": root, "model": model, "data": swift_dataset(str(root)), "config_only": str(config_only)}


def _trained(workspace, tuner: str, *extra: str) -> str:
    output = str(workspace["root"] / f"out_{tuner}")
    flags = swift_flags(workspace["model"], workspace["data"], output, tuner)
    done = run(launcher("--visual_region", SPEC, *flags, *extra))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return checkpoint(output)


@pytest.fixture(scope="module")
def full_checkpoint(workspace):
    return _trained(workspace, "full", "--freeze_aligner", "false")  # the paper's setting: the projector trains


@pytest.fixture(scope="module")
def lora_checkpoint(workspace):
    return _trained(workspace, "lora", "--lora_rank", "4")  # swift's defaults: vision tower and projector frozen


def test_full_changes_exactly_region_and_projector(workspace, full_checkpoint):
    import torch
    from safetensors.torch import load_file

    base = load_file(os.path.join(workspace["model"], "model.safetensors"))
    tuned = load_file(os.path.join(full_checkpoint, "model.safetensors"))
    assert set(tuned) == set(base)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    expected = {k for k in base if kind(k) in {("layer", i) for i in REGION} | {("projector", None)}}
    assert changed == expected  # everything else (other layers, vision tower, embeddings, norm, lm_head): bit-identical
    with open(os.path.join(full_checkpoint, "config.json"), encoding="utf-8") as handle:
        recorded = json.load(handle)["visual_region"]
    assert recorded == {"spec": SPEC, "layers": REGION, "num_layers": 8}
    with open(os.path.join(os.path.dirname(full_checkpoint), "region_plan.json"), encoding="utf-8") as handle:
        plan = json.load(handle)
    assert {kind(n) for n in plan["trainable_names"]} == {("layer", 1), ("layer", 7), ("projector", None)}


def test_full_checkpoint_reloads_with_region(full_checkpoint):
    from transformers import AutoModelForImageTextToText

    from vr_plugin.record import read_region

    model = AutoModelForImageTextToText.from_pretrained(full_checkpoint)
    assert read_region(model).layers == REGION


def test_lora_adapters_only_in_region_layers(workspace, lora_checkpoint):
    from safetensors.torch import load_file

    from vr_plugin.record import read_region

    adapter = load_file(os.path.join(lora_checkpoint, "adapter_model.safetensors"))
    kinds = {kind(k) for k in adapter}
    assert kinds == {("layer", i) for i in REGION}  # no projector / vision adapters: --freeze_* kept
    for index in REGION:
        modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter if kind(k) == ("layer", index)}
        assert modules == LINEAR_KINDS
    assert any(k.endswith("lora_B.weight") and adapter[k].abs().sum() > 0 for k in adapter)  # it trained
    assert os.path.isfile(os.path.join(lora_checkpoint, "visual_region.json"))
    assert read_region(lora_checkpoint).layers == REGION


def test_lora_adapter_reloads_on_the_base(workspace, lora_checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(workspace["model"])
    model = PeftModel.from_pretrained(base, lora_checkpoint)
    layers = {kind(name)[1] for name, _ in model.named_parameters() if "lora_" in name}
    assert layers == set(REGION)


def test_bad_spec_fails_before_weights_load(workspace, tmp_path):
    output = str(tmp_path / "out")
    flags = swift_flags(workspace["config_only"], workspace["data"], output, "full")
    done = run(launcher("--visual_region", "uniform_bogus", *flags))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --visual_region") and "uniform_bogus" in last and "Accepted forms" in last
    assert "run sh:" not in done.stdout and not os.path.exists(output)  # swift never started


def test_conflicting_freeze_option_fails_before_weights_load(workspace, tmp_path):
    output = str(tmp_path / "out")
    flags = swift_flags(workspace["config_only"], workspace["data"], output, "full")
    done = run(launcher("--visual_region", SPEC, *flags, "--freeze_llm", "true"))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: --freeze_llm true conflicts with --visual_region")
    assert "run sh:" not in done.stdout and not os.path.exists(output)


@pytest.mark.parametrize(
    "option",
    [
        ["--freeze_parameters", "model.language_model.layers.0"],
        ["--freeze_parameters_regex", r"layers\.3\."],
        ["--freeze_parameters_ratio", "0.5"],
        ["--trainable_parameters", "model.language_model.layers.3"],
        ["--trainable_parameters_regex", r"layers\.3\."],
        ["--freeze_llm"],
        ["--target_regex", "q_proj"],
    ],
)
def test_every_swift_layer_freezing_option_is_refused(workspace, option):
    from vr_plugin.integrations.swift import prepare_argv

    argv = ["sft", "--visual_region", SPEC, "--model", workspace["config_only"], "--tuner_type", "lora", *option]
    with pytest.raises(ValueError, match=re.escape(option[0]) + ".* conflicts with --visual_region"):
        prepare_argv(argv)


def test_prepare_argv_keeps_user_flags_and_restricts_lora(workspace):
    from vr_plugin.integrations.swift import PLUGIN_FILE, prepare_argv

    argv = ["sft", "--visual_region", SPEC, "--model", workspace["config_only"], "--freeze_llm", "false"]
    command, swift_argv, env = prepare_argv([*argv, "--callbacks", "perf_log", "--target_modules", "q_proj", "v_proj"])
    assert command == "sft" and env == {"VISUAL_REGION": SPEC} and "--visual_region" not in swift_argv
    assert swift_argv[swift_argv.index("--callbacks") + 1 :][:2] == ["perf_log", "visual_region"]
    assert swift_argv[swift_argv.index("--external_plugins") + 1] == PLUGIN_FILE
    regex = swift_argv[swift_argv.index("--target_regex") + 1]
    assert re.fullmatch(regex, "model.language_model.layers.7.self_attn.v_proj")
    assert not re.fullmatch(regex, "model.language_model.layers.2.self_attn.v_proj")
    assert not re.fullmatch(regex, "model.language_model.layers.1.mlp.up_proj")
    assert not re.fullmatch(regex, "model.vision_tower.vision_model.encoder.layers.1.self_attn.v_proj")


def test_plugin_form_refuses_to_unfreeze_what_swift_froze(workspace, tmp_path):
    """Plain ``swift sft --external_plugins ... --callbacks visual_region`` (spec from VISUAL_REGION): with swift's
    own --freeze_llm the region layers are frozen by swift, and the callback refuses instead of unfreezing them."""
    from vr_plugin.integrations.swift import PLUGIN_FILE

    swift = os.path.join(os.path.dirname(sys.executable), "swift")
    flags = swift_flags(workspace["model"], workspace["data"], str(tmp_path / "out"), "full")
    plugin = ["--external_plugins", PLUGIN_FILE, "--callbacks", "visual_region", "--freeze_llm", "true"]
    done = run([swift, "sft", *flags, *plugin], env={"VISUAL_REGION": SPEC})
    assert done.returncode != 0
    assert "swift froze model.language_model.layers.1." in done.stderr and "--freeze_llm" in done.stderr
    assert not glob.glob(str(tmp_path / "out" / "v*" / "checkpoint-*"))
