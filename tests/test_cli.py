"""The vr-plugin command: every subcommand's happy path and its bad-input paths (one line, exit status 2).

Commands run in-process through ``vr_plugin.cli.main`` (the console script's function); a few run as
``python -m vr_plugin`` in a fresh interpreter to see the real exit status and that no traceback is printed.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig

from vr_plugin import read_pruning, read_region
from vr_plugin.cli import main
from vr_plugin.synthetic import make_vqa_dataset
from vr_plugin.tiny import available, save_tiny_lvlm

from .common import free_port, requires_cpu_bnb
from .matrix import PATHS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = "model.language_model.layers"
QWEN = available("qwen2_vl")
TRAIN_ARCHS = [a for a in ("llava", "llava_next", "qwen2_vl") if available(a)]


def cli(capsys, *argv):
    """Run ``vr-plugin argv`` in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fails(capsys, *argv, match):
    """The command exits with 2 and prints exactly one error line matching ``match`` (a substring)."""
    code, out, err = cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("vr-plugin ")]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith(f"vr-plugin {argv[0]}: error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def python_m(*argv, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "vr_plugin", *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vqa_dataset(str(tmp_path_factory.mktemp("vqa")), n_train=12, n_test=6)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_tiny_lvlm("llava", str(tmp_path_factory.mktemp("llava") / "model"))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    if not QWEN:
        pytest.skip("no Qwen2-VL in this transformers")
    return save_tiny_lvlm("qwen2_vl", str(tmp_path_factory.mktemp("qwen") / "model"))


def weights(path):
    return {n: p.detach().clone() for n, p in AutoModelForImageTextToText.from_pretrained(path).named_parameters()}


# ------------------------------------------------------------------------------------------------ top level


def test_help_of_every_subcommand_has_examples(capsys):
    for command in ("select", "inspect", "train", "eval", "score", "prune", "demo", "sweep"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out, command
    assert main(["train", "--hf_help"]) == 0
    assert "--gradient_accumulation_steps" in capsys.readouterr().out
    run = python_m("--help")  # the module entry point, as torchrun / accelerate launch / deepspeed start it
    assert run.returncode == 0 and all(c in run.stdout for c in ("select", "inspect", "train", "demo"))


def test_no_command_and_unknown_flag_are_usage_errors(capsys):
    for argv in ([], ["select", "uniform_0.25", "--num-layers", "8", "--bogus"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "usage: vr-plugin" in capsys.readouterr().err


def test_real_exit_status_and_no_traceback():
    run = python_m("select", "uniform_0.3x", "--num-layers", "32")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        line for line in run.stderr.strip().splitlines() if line.startswith("vr-plugin select: error: ")
    ]
    assert "'uniform_0.3x'" in run.stderr and "Accepted forms" in run.stderr and "Traceback" not in run.stderr


# ------------------------------------------------------------------------------------------------ select


def test_select(capsys):
    assert cli(capsys, "select", "uniform_0.25", "--num-layers", 32)[:2] == (0, "1,5,9,13,19,23,27,31\n")
    assert cli(capsys, "select", "none", "--num_layers", 4)[:2] == (0, "(none)\n")
    assert cli(capsys, "-q", "select", "last_2", "--num-layers", 4)[:2] == (0, "2,3\n")
    fails(capsys, "select", "uniform_1.5", "--num-layers", 32, match="the fraction 1.5 is not in (0, 1]")
    fails(capsys, "select", "uniform_0.25", "--num-layers", 0, match="num_layers must be a positive integer, got 0")


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_tiny_directories(capsys, llava, qwen):
    code, out, _ = cli(capsys, "inspect", llava)
    assert code == 0
    assert "LLM depth    8 decoder layers at model.language_model.layers" in out
    assert "region       'uniform_0.25' (default): 2 layers [1,7]" in out
    assert "depth        .#.....#" in out and "trainable    18.49% of all parameters" in out
    assert "region layers           73,984          73,984" in out and "vision tower                 0" in out
    code, out, _ = cli(capsys, "inspect", qwen, "--visual_region", "first_2")
    assert code == 0 and "Qwen2VLForConditionalGeneration" in out and "2 layers [0,1]" in out


def test_inspect_13b_config_without_weights_is_instant(capsys, tmp_path):
    config = LlavaConfig(
        text_config=dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                         num_attention_heads=40, vocab_size=32064),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
    )  # fmt: skip
    config.save_pretrained(tmp_path)  # config.json only: no weights to read
    start = time.perf_counter()
    code, out, _ = cli(capsys, "inspect", tmp_path)
    elapsed = time.perf_counter() - start
    assert code == 0 and elapsed < 30, elapsed  # seconds even on a loaded 2-core machine; weights would be 26 GB
    assert "LLM depth    40 decoder layers" in out
    assert "10 layers [1,5,9,13,17,23,27,31,35,39]" in out
    assert "all              3,203,512,320  13,351,494,656" in out


def test_inspect_bad_inputs(capsys, tmp_path, llava):
    fails(capsys, "inspect", tmp_path / "missing", match=f"model directory '{tmp_path / 'missing'}' does not exist")
    fails(capsys, "inspect", tmp_path, match="is a directory but holds no config.json")
    fails(capsys, "inspect", llava, "--visual_region", "uniform_9", match="the layer count 9 is outside 1..8")


# ------------------------------------------------------------------------------------------------ train + eval


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, llava, qwen):
    """``tiny_dir(arch)``: a saved tiny model directory of ``arch`` (one per module)."""
    made = {"llava": llava, "qwen2_vl": qwen}

    def get(arch):
        if arch not in made:
            made[arch] = save_tiny_lvlm(arch, str(tmp_path_factory.mktemp(arch) / "model"))
        return made[arch]

    return get


def _moved(base, trained):
    before, after = weights(base), weights(trained)
    return {n for n in before if not torch.equal(before[n], after[n])}, before


@pytest.mark.parametrize("arch", TRAIN_ARCHS)
def test_train_region_end_to_end(capsys, tmp_path, tiny_dir, data, arch):
    model_dir, out = tiny_dir(arch), tmp_path / "run"
    code, stdout, err = cli(
        capsys, "train", "--model", model_dir, "--data", data["train"], "--images", data["images"],
        "--visual_region", "uniform_0.25", "--output", out, "--max_steps", 3, "--per_device_train_batch_size", 4,
        "--learning_rate", 1e-2, "--save_strategy", "no", "--seed", 0, "--logging_steps", 1,
    )  # fmt: skip
    assert code == 0, err
    assert "trained layers [1,7] of 8 (uniform_0.25)" in stdout and f"saved to {out}" in stdout
    assert json.loads((out / "config.json").read_text())["visual_region"] == {
        "spec": "uniform_0.25", "layers": [1, 7], "num_layers": 8
    }  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and any("loss" in h for h in state["log_history"])
    # plain from_pretrained; exactly the region layers and the projector moved (the vision tower stays frozen)
    layers, projector, _ = PATHS[arch]
    moved, before = _moved(model_dir, out)
    assert moved == {n for n in before if n.startswith((f"{layers}.1.", f"{layers}.7.", *projector))}
    code, stdout, _ = cli(
        capsys, "eval", "--model", out, "--data", data["test"], "--images", data["images"],
        "--out", tmp_path / "pred.json", "--max_new_tokens", 4,
    )  # fmt: skip
    assert code == 0 and stdout.startswith("accuracy ") and "/6 records)" in stdout
    report = json.loads((tmp_path / "pred.json").read_text())
    assert report["total"] == 6 and f"{100 * report['accuracy']:.2f}%" in stdout


@pytest.mark.parametrize("arch", [a for a in ("llava", "qwen2_vl") if a in TRAIN_ARCHS])
def test_train_lora_end_to_end(capsys, tmp_path, tiny_dir, data, arch):
    model_dir, out = tiny_dir(arch), tmp_path / "lora"
    code, stdout, err = cli(
        capsys, "train", "--model", model_dir, "--data", data["train"], "--images", data["images"], "--lora",
        "--lora_r", 4, "--merge_lora", "--output", out, "--max_steps", 2, "--per_device_train_batch_size", 3,
        "--learning_rate", 1e-2, "--save_strategy", "no", "--projector_lr", 1e-3,
    )  # fmt: skip
    assert code == 0, err
    assert f"saved to {out}, {out / 'merged'}" in stdout
    assert json.loads((out / "visual_region.json").read_text())["layers"] == [1, 7]
    code, stdout, _ = cli(capsys, "inspect", out)  # an adapter directory maps through its base's config
    assert code == 0 and "region       'uniform_0.25' (recorded in the config): 2 layers [1,7]" in stdout
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == os.path.abspath(model_dir)
    # the adapter directory loads with plain from_pretrained (transformers' peft integration) ...
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    lora = {n.split(".lora_A")[0] for n, _ in loaded.named_parameters() if "lora_A" in n}
    layers = PATHS[arch].layers
    assert lora and all(n.startswith((f"{layers}.1.", f"{layers}.7.")) for n in lora)
    # ... the merged model too: only the region's linear weights and the projector differ from the base
    moved, before = _moved(model_dir, out / "merged")
    region = {n for n in before if n.startswith((f"{layers}.1.", f"{layers}.7.")) and n.endswith("proj.weight")}
    assert moved == region | {n for n in before if n.startswith(tuple(PATHS[arch].projector))}
    assert read_region(str(out / "merged")).layers == [1, 7]
    # adapter and merged directories evaluate to the same predictions
    predictions = []
    for model in (out, out / "merged"):
        target = tmp_path / f"{model.name}.json"
        code, stdout, err = cli(capsys, "eval", "--model", model, "--data", data["test"], "--images", data["images"],
                                "--out", target, "--batch_size", 4, "--max_new_tokens", 4)  # fmt: skip
        assert code == 0, err
        predictions.append([p["prediction"] for p in json.loads(target.read_text())["predictions"]])
    assert predictions[0] == predictions[1]


@requires_cpu_bnb
def test_train_qlora_4bit(capsys, tmp_path, llava, data):
    out = tmp_path / "qlora"
    code, stdout, err = cli(
        capsys, "train", "--model", llava, "--data", data["train"], "--images", data["images"], "--lora", "--bits", 4,
        "--lora_r", 4, "--output", out, "--max_steps", 2, "--per_device_train_batch_size", 4, "--save_strategy", "no",
    )  # fmt: skip
    assert code == 0, err
    assert (out / "adapter_model.safetensors").is_file() and read_region(str(out)).layers == [1, 7]


@requires_cpu_bnb
def test_train_hybrid_nf4_outside_the_region(capsys, tmp_path, llava, data):
    from vr_plugin.quant import quantized_layers

    out = tmp_path / "hybrid"
    code, _, err = cli(
        capsys, "train", "--model", llava, "--data", data["train"], "--images", data["images"],
        "--quantize_frozen", "nf4", "--output", out, "--max_steps", 2, "--per_device_train_batch_size", 4,
        "--learning_rate", 1e-2, "--save_strategy", "no",
    )  # fmt: skip
    assert code == 0, err
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert quantized_layers(reloaded) == {i: i not in (1, 7) for i in range(8)}
    assert (out / "region_state.safetensors").is_file()


def test_projector_learning_rate_group(tmp_path, llava, data):
    from transformers import TrainingArguments

    from vr_plugin import RegionFreezeCallback
    from vr_plugin.data import Collator, ConversationDataset, load_processor
    from vr_plugin.integrations.hf import RegionTrainer

    processor = load_processor(llava)
    args = TrainingArguments(str(tmp_path), learning_rate=1e-3, report_to=[], use_cpu=True, weight_decay=0.1)
    trainer = RegionTrainer(
        model=AutoModelForImageTextToText.from_pretrained(llava),
        args=args,
        train_dataset=ConversationDataset(data["train"], data["images"], processor),
        data_collator=Collator(processor),
        callbacks=[RegionFreezeCallback("uniform_0.25", tune_vision_tower=False)],
        projector_lr=2e-5,
    )
    groups = trainer.create_optimizer().param_groups
    assert {(g["name"], g["lr"]) for g in groups} == {("main", 1e-3), ("projector", 2e-5)}
    plan = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RegionFreezeCallback)).plan
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in plan.trainable_params}


def test_train_bad_inputs(capsys, tmp_path, llava, data):
    base = ["train", "--model", llava, "--data", data["train"], "--images", data["images"], "--output", tmp_path / "o"]
    fails(capsys, "train", "--model", tmp_path / "nope", "--data", data["train"], "--output", tmp_path,
          match=f"model directory '{tmp_path / 'nope'}' does not exist")  # fmt: skip
    fails(capsys, "train", "--model", llava, "--data", tmp_path / "conv.json", "--output", tmp_path,
          match=f"conversation file '{tmp_path / 'conv.json'}' does not exist")  # fmt: skip
    fails(capsys, *base[:5], "--images", tmp_path / "imgs", "--output", tmp_path,
          match=f"image folder '{tmp_path / 'imgs'}' does not exist")  # fmt: skip
    fails(capsys, *base, "--visual_region", "uniform_x", match="Invalid visual region 'uniform_x'")
    fails(capsys, *base, "--visual_region", "uniform_12", match="the layer count 12 is outside 1..8")
    fails(capsys, *base, "--bits", 4, match="trains LoRA adapters on a quantized base (QLoRA): add --lora")
    fails(capsys, *base, "--lora", "--quantize_frozen", "nf4", match="drop --lora")
    fails(capsys, *base, "--merge_lora", match="merge_lora merges LoRA into a full-precision base")
    fails(capsys, *base, "--num_train_epochz", 1, match="unrecognized arguments: --num_train_epochz 1 (neither")
    fails(capsys, *base, "--learning_rate", "fast", match="invalid float value: 'fast'")
    fails(capsys, *base[:-2], match="the following arguments are required: --output")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": [{"from": "gpt", "value": "hi"}]}]))
    fails(capsys, *base[:4], bad, *base[5:], match="bad.json: record 'x': conversations[0].from is 'gpt'")
    gone = tmp_path / "gone.json"
    gone.write_text(json.dumps([{"id": "g", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]}]))  # fmt: skip
    fails(capsys, *base[:4], gone, *base[5:], match="record 0 (id 'g') of ")
    assert "missing.png" in fails(capsys, *base[:4], gone, *base[5:], match="image 'missing.png' does not exist")
    assert not (tmp_path / "o").exists()  # refused before the output was touched


def test_missing_optional_dependency_is_one_line(capsys, monkeypatch, tmp_path, llava, data):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    line = fails(
        capsys, "train", "--model", llava, "--data", data["train"], "--images", data["images"], "--lora", "--bits", 4,
        "--output", tmp_path, match="missing optional dependency 'bitsandbytes'",
    )  # fmt: skip
    assert "pip install 'vr-plugin[qlora]'" in line


def test_eval_bad_inputs(capsys, tmp_path, llava, data):
    base = ["eval", "--model", llava, "--data", data["test"], "--images", data["images"]]
    fails(capsys, "eval", "--model", llava, "--data", tmp_path / "qa.json",
          match=f"question-answer file '{tmp_path / 'qa.json'}' does not exist")  # fmt: skip
    fails(capsys, *base[:5], "--images", tmp_path / "i", match=f"image folder '{tmp_path / 'i'}' does not exist")
    fails(capsys, "eval", "--model", tmp_path / "m", *base[3:], match="model directory")
    fails(capsys, *base, "--limit", 0, match="--limit must be >= 1, got 0")
    fails(capsys, *base, "--batch_size", 0, "--out", tmp_path / "p.json", match="--batch_size must be >= 1, got 0")
    open_ended = tmp_path / "open.json"
    open_ended.write_text(json.dumps([{"id": "q", "conversations": [{"from": "human", "value": "Q?"}]}]))
    fails(capsys, *base[:4], open_ended, match="record 'q': the last turn must be the gpt answer")


# ------------------------------------------------------------------------------------------------ score + prune


def test_score_prune_and_reload(capsys, tmp_path, llava, data):
    scores = tmp_path / "scores.json"
    code, out, err = cli(capsys, "score", "--model", llava, "--data", data["calibration"], "--images", data["images"],
                         "--out", scores, "--batch_size", 3)  # fmt: skip
    assert code == 0, err
    saved = json.loads(scores.read_text())
    assert saved["metric"] == "angular" and len(saved["scores"]) == 8 and saved["tokens"] > 0
    assert "(rank 1 = least important)" in out and f"angular scores of 8 layers written to {scores}" in out
    lowest = sorted(range(8), key=lambda i: (saved["scores"][str(i)], i))[:2]

    pruned = tmp_path / "pruned"
    code, out, err = cli(capsys, "prune", "--model", llava, "--scores", scores, "--remove", 2, "--output", pruned)
    assert code == 0, err
    record = read_pruning(str(pruned))
    assert record.removed == sorted(lowest) and record.original_num_layers == 8
    config = AutoConfig.from_pretrained(pruned)
    assert config.text_config.num_hidden_layers == 6
    model = AutoModelForImageTextToText.from_pretrained(pruned)  # plain from_pretrained
    assert len(model.model.language_model.layers) == 6
    code, out, _ = cli(capsys, "eval", "--model", pruned, "--data", data["test"], "--images", data["images"],
                       "--out", tmp_path / "p.json", "--max_new_tokens", 3)  # fmt: skip
    assert code == 0 and out.startswith("accuracy ")

    explicit = tmp_path / "explicit"
    code, out, _ = cli(capsys, "prune", "--model", llava, "--layers", "2,3", "--output", explicit)
    assert code == 0 and "removed layers [2,3] (original numbering), kept 6/8" in out


def test_score_weight_change(capsys, tmp_path, llava):
    code, out, err = cli(capsys, "score", "--model", llava, "--metric", "weight_change", "--reference", llava,
                         "--out", tmp_path / "wc.json")  # fmt: skip
    assert code == 0, err
    assert set(json.loads((tmp_path / "wc.json").read_text())["scores"].values()) == {0.0}  # the same weights


def test_score_and_prune_bad_inputs(capsys, tmp_path, llava, data):
    fails(capsys, "score", "--model", llava, match="--metric angular needs --data CALIBRATION.json")
    fails(capsys, "score", "--model", llava, "--metric", "weight_change", match="needs --reference BASE_MODEL_DIR")
    fails(capsys, "score", "--model", llava, "--data", tmp_path / "c.json", match="calibration file")
    fails(capsys, "score", "--model", llava, "--data", data["calibration"], "--images", data["images"],
          "--n", 3, "--metric", "bi", "--out", tmp_path / "s.json", match="n=3 is only valid for metric 'angular'",
    )  # fmt: skip
    with pytest.raises(SystemExit):
        main(["score", "--model", str(llava), "--metric", "nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err

    scores = tmp_path / "s.json"
    scores.write_text(json.dumps({"metric": "angular", "scores": {str(i): float(i) for i in range(8)},
                                  "num_layers": 8}))  # fmt: skip
    base = ["prune", "--model", llava, "--output", tmp_path / "out"]
    fails(capsys, *base, match="give either --remove COUNT|RATIO (with --scores) or --layers")
    fails(capsys, *base, "--remove", 2, "--layers", "2", match="give either --remove")
    fails(capsys, *base, "--remove", 2, match="it needs --scores SCORES.json")
    fails(capsys, *base, "--remove", 2, "--scores", tmp_path / "x.json", match="scores file")
    fails(capsys, *base, "--remove", 7, "--scores", scores, "--visual_region", "uniform_0.25",
          match="cannot remove 7 layers: only 6 lie outside the region [1, 7]")  # fmt: skip
    fails(capsys, *base, "--layers", "1,2", "--visual_region", "uniform_0.25", match="layers [1] are in the visual")
    fails(capsys, *base, "--layers", "9", match="layer 9 is out of range 0..7")
    with pytest.raises(SystemExit):
        main([*map(str, base), "--remove", "1.5", "--scores", str(scores)])
    assert "ratio 1.5 is not in (0, 1)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ launchers


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--loss_chunk", "4"]], ids=["plain", "loss_chunk"])
def test_train_under_deepspeed_zero3_two_ranks(tmp_path, llava, data, extra):
    """`deepspeed --module vr_plugin train` (it inserts --local_rank before the subcommand), ZeRO-3, 2 CPU ranks;
    also with the loss in chunks (the partitioned lm_head gathered for every chunk, in forward and recompute)."""
    pytest.importorskip("deepspeed")
    import shutil

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    }))  # fmt: skip
    out = tmp_path / "out"
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    command = [
        launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "vr_plugin", "train",
        "--model", llava,
        "--data", data["train"], "--images", data["images"], "--output", out, "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--save_strategy", "no",
        "--deepspeed", config, "--disable_tqdm", "true", *extra,
    ]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    run = subprocess.run(list(map(str, command)), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("trained layers [1,7] of 8 (uniform_0.25), 18.49% of the parameters") == 1  # rank 0
    before, after = weights(llava), weights(out)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == {
        n for n in before if n.startswith((f"{LAYERS}.1.", f"{LAYERS}.7.", "model.multi_modal_projector."))
    }
    assert read_region(str(out)).layers == [1, 7]


@pytest.mark.distributed
@pytest.mark.slow
def test_train_under_torchrun_ddp_two_ranks(tmp_path, llava, data):
    """`torchrun -m vr_plugin train` with 2 CPU ranks (gloo DDP; --use_cpu makes the Trainer see both ranks)."""
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "vr_plugin", "train", "--model", llava, "--data", data["train"], "--images", data["images"],
        "--output", out, "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
        "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true", "--logging_steps", "1",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    run = subprocess.run(list(map(str, command)), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("trained layers [1,7] of 8 (uniform_0.25)") == 1  # rank 0 only
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["epoch"] == 2 * 2 * 2 / 12  # 2 ranks x 2 samples a step, 12 samples
    before, after = weights(llava), weights(out)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == {
        n for n in before if n.startswith((f"{LAYERS}.1.", f"{LAYERS}.7.", "model.multi_modal_projector."))
    }
