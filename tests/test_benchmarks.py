"""Smoke tests of benchmarks/: every script runs at a tiny size and writes the expected JSON; argument parsing,
including the --device cuda presets (no GPU needed to parse them). No timing assertions."""

import json
import os
import subprocess
import sys

import pytest

from vr_plugin import select_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
SCRIPTS = ("train_step", "prune_latency", "score_cost", "chunked_loss")

sys.path.insert(0, BENCHMARKS)
import benchlib  # noqa: E402
import chunked_loss  # noqa: E402
import prune_latency  # noqa: E402
import score_cost  # noqa: E402
import train_step  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All the scripts started at once with --quick (they overlap on a multi-core machine), JSON paths back."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {}
    for name in SCRIPTS:
        path = out / f"{name}.json"
        cmd = [sys.executable, os.path.join(BENCHMARKS, f"{name}.py"), "--quick", "--out", str(path)]
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE), path)
    results = {}
    for name, (proc, path) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[name] = (proc.returncode, stdout.decode(), stderr.decode(), path)
    return results


def _report(runs, name):
    code, stdout, stderr, path = runs[name]
    assert code == 0, stderr[-3000:]
    assert "| " in stdout and "Machine:" in stdout  # the markdown tables were printed
    with open(path) as handle:
        report = json.load(handle)
    assert report["benchmark"] == name
    assert {"nproc", "loadavg_start", "loadavg_end", "torch"} <= set(report["machine"])
    return report


def test_train_step_json(runs):
    report = _report(runs, "train_step")
    rows = {row["mode"]: row for row in report["rows"]}
    assert list(rows) == list(train_step.MODES)
    for mode, row in rows.items():
        assert row["ok"], (mode, row.get("error"))
        for key in ("step_s", "peak_bytes", "trainable", "optimizer_state_bytes", "time_vs_full", "time_vs_lora_all"):
            assert key in row, (mode, key)
        assert row["trainable"] > 0 and row["optimizer_state_bytes"] > 0
    full, region = rows["full"], rows["region"]
    assert region["trainable"] < full["trainable"] and rows["lora_region"]["trainable"] < rows["lora_all"]["trainable"]
    assert rows["qlora_region"]["trainable"] == rows["lora_region"]["trainable"]
    assert rows["hybrid"]["trainable"] == region["trainable"]
    assert rows["hybrid"]["optimizer"] == "AdamW8bit"  # 1 byte per state value instead of 4
    assert rows["hybrid"]["optimizer_state_bytes"] < region["optimizer_state_bytes"] / 2
    assert {t["target"].split(" step")[0] for t in report["targets"]} >= {"region full-parameter", "LoRA region"}


def test_prune_latency_json(runs):
    report = _report(runs, "prune_latency")
    rows = report["rows"]
    assert [row["k"] for row in rows] == [0, 1, 2, 4]
    region = set(select_layers("uniform_0.25", benchlib.TINY.layers))
    for row in rows:
        assert row["layers"] == 8 - row["k"] and len(row["removed"]) == row["k"]
        assert not set(row["removed"]) & region
        assert row["ideal"] == 8 / (8 - row["k"])
        for key in ("prefill_ms", "decode_tokens_per_s", "decode_vs_ideal", "prefill_vs_ideal", "decode_cpu_vs_ideal"):
            assert key in row, key  # values are timings: not asserted
    assert len(report["targets"]) == 3


def test_score_cost_json(runs):
    report = _report(runs, "score_cost")
    assert [row["what"] for row in report["time_rows"]] == ["plain forward (no_grad)", "score_layers (bi)"]
    memory = {row["what"]: row for row in report["memory_rows"]}
    assert len(memory) == 3
    for row in memory.values():
        assert {"mib_8", "mib_16", "growth_mib", "growth_hidden_states"} <= set(row)
    assert len(report["targets"]) == 2


def test_chunked_loss_json(runs):
    report = _report(runs, "chunked_loss")
    rows = report["rows"]
    assert [row["mode"] for row in rows] == list(chunked_loss.MODES)
    for row in rows:
        assert row["error"] is None and row["peak_gb"] >= 0 and row["seconds"] > 0, row
        assert row["loss"] == pytest.approx(rows[0]["loss"], rel=1e-3)  # one loss, three ways of computing it


@pytest.mark.parametrize("module", [train_step, prune_latency, score_cost])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--device" in capsys.readouterr().out


def test_cuda_presets_parse_without_a_gpu():
    args = train_step.parse_args(["--device", "cuda"])
    shape = benchlib.resolve_shape(args)
    assert shape.name == "llama3-8b" and (shape.layers, shape.hidden, shape.intermediate) == (32, 4096, 14336)
    assert (shape.kv_heads, shape.vocab, shape.seq, shape.batch, shape.lora_r) == (8, 128256, 2048, 1, 128)
    assert shape.image_tokens == 576
    assert args.dtype == "bfloat16" and args.gradient_checkpointing and args.hybrid_optim == "adamw8bit"
    assert args.isolate and not args.interleave and args.modes == list(train_step.MODES)
    assert train_step.parse_args([]).interleave  # cpu: modes timed round-robin in one process

    args = train_step.parse_args(["--device", "cuda", "--preset", "vicuna-7b", "--layers", "16", "--modes", "full"])
    shape = benchlib.resolve_shape(args)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.kv_heads, shape.vocab) == (16, 4096, 11008, 32, 32000)
    assert args.modes == ["full"]

    args = prune_latency.parse_args(["--device", "cuda", "--preset", "vicuna-7b"])
    assert args.dtype == "bfloat16" and not args.interleave and args.remove == [1, 2, 4, 8]
    args = score_cost.parse_args(["--device", "cuda"])
    assert args.dtype == "bfloat16" and args.isolate


def test_cpu_default_keeps_the_real_proportions():
    shape = benchlib.resolve_shape(train_step.parse_args([]))
    assert shape is benchlib.CPU and shape.layers == 32
    vicuna = benchlib.VICUNA_7B
    assert shape.hidden / shape.lora_r == vicuna.hidden / vicuna.lora_r == 32
    assert abs(shape.intermediate / shape.hidden - vicuna.intermediate / vicuna.hidden) < 0.01
    assert shape.seq / shape.hidden == vicuna.seq / vicuna.hidden
    # --hidden rescales the MLP and the LoRA rank with it
    wide = benchlib.resolve_shape(train_step.parse_args(["--hidden", "512"]))
    assert (wide.hidden, wide.intermediate, wide.lora_r, wide.heads) == (512, 1376, 16, 8)


def test_bad_arguments():
    with pytest.raises(SystemExit):
        train_step.parse_args(["--modes", "full,nonsense"])
    with pytest.raises(SystemExit):
        prune_latency.parse_args(["--new-tokens", "1"])
