"""benchmarks/gpu_suite.py --dry-run: the GPU suite's own code path (every train mode, checkpointing off, the
attention switch, a base checkpoint for the quantized modes, pruned decode, scoring cost, a real out-of-memory
job, the report writer) on CPU at tiny shapes, each job in its own process as on the GPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)
import gpu_suite  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_dry")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(BENCHMARKS, "gpu_suite.py"), "--dry-run", "--out-dir", str(out)]
    proc = subprocess.run(cmd + ["--budget-s", "900"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "RESULTS-gpu.json") as handle:
        report = json.load(handle)
    return proc, report, (out / "RESULTS-gpu.md").read_text()


def test_every_mode_measured(dry_run):
    _, report, _ = dry_run
    rows = {(r["group"], r["mode"]): r for r in report["train_rows"]}
    for mode in gpu_suite.TRAIN_MODES:
        row = rows[("targets", mode)]
        assert row["status"] == "ok", (mode, row["status"])
        assert row["step_s"] > 0 and row["peak_gb"] > 0 and row["trainable"] > 0
        assert row["attention_used"] == "sdpa" and row["gc"] is True
    assert rows[("targets", "hybrid")]["optimizer"] == "AdamW8bit"
    assert rows[("targets", "hybrid")]["trainable"] == rows[("targets", "region")]["trainable"]
    assert rows[("targets", "lora_region")]["trainable"] < rows[("targets", "lora_all")]["trainable"]
    assert rows[("targets", "qlora_region")]["trainable"] == rows[("targets", "lora_region")]["trainable"]
    no_gc = rows[("no_checkpointing", "region")]
    assert no_gc["status"] == "ok" and no_gc["gc"] is False
    for mode in ("region", "hybrid"):  # the second attention (flash-attn 2 on a GPU; eager here) really switched
        assert rows[("eager", mode)]["status"] == "ok" and rows[("eager", mode)]["attention_used"] == "eager"
    chunked = rows[("loss_chunk", "hybrid")]  # the hybrid again, its loss in chunks: same trainable set
    assert chunked["status"] == "ok" and chunked["loss_chunk"] == gpu_suite.LOSS_CHUNK
    assert chunked["trainable"] == rows[("targets", "hybrid")]["trainable"]


def test_oom_is_reported_and_the_suite_goes_on(dry_run):
    _, report, markdown = dry_run
    probe = [r for r in report["train_rows"] if r["group"] == "oom_probe"]
    assert [r["status"] for r in probe] == ["OOM"]
    assert "full tiny sdpa gc=on: OOM" in markdown
    assert report["jobs"][-1]["label"] == "full tiny sdpa gc=on"  # the last job ran, and the report was written


def test_inference_and_report(dry_run):
    proc, report, markdown = dry_run
    assert [r["k"] for r in report["prune"]["rows"]] == [0, 1, 2]
    assert [r["what"] for r in report["score"]["time_rows"]] == ["plain forward (no_grad)", "score_layers (bi)"]
    names = [t["target"] for t in report["targets"]]
    assert names[:5] == [
        "region full-parameter step time / full tuning",
        "region LoRA step time / all-layer LoRA",
        "hybrid peak max_memory_allocated, GB (24 GB card)",
        "hybrid peak max_memory_reserved, GB (24 GB card)",
        "region full-parameter bf16 peak reserved, GB (80 GB card)",
    ]
    assert names[5] == f"hybrid + loss_chunk {gpu_suite.LOSS_CHUNK} peak max_memory_allocated, GB (24 GB card)"
    assert any(n.startswith("decode speedup / ideal") for n in names) and "score_layers time / plain forward" in names
    assert report["dry_run"] and "Dry run" in markdown and "## Targets" in markdown
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| score_layers peak growth")  # the target table ends it
    assert not [j for j in report["jobs"] if not j["ok"] and j["label"] != "full tiny sdpa gc=on"]


def test_plan_without_a_gpu():
    args = gpu_suite.parse_args([])
    assert args.device == "cuda" and args.budget_s == 480 and not args.tiny
    groups = dict(gpu_suite.job_groups(args))
    assert list(groups)[:4] == ["targets", "inference", "no_checkpointing", "loss_chunk"] and "vicuna-7b" in groups
    modes = [j["mode"] for j in groups["targets"] if j["kind"] == "train"]
    assert sorted(modes) == sorted(gpu_suite.TRAIN_MODES)
    assert {j["preset"] for j in groups["targets"]} == {"llama3-8b"}
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--groups", "nonsense"])
