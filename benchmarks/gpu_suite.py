"""One command for the GPU numbers: train steps at the 8B / 7B shapes in six modes, pruned decode, scoring cost.

Every measurement (one mode at one setting, the quantized modes' base checkpoint, the pruned-decode run, the
scoring-cost run) runs in its own Python process, so each starts on a fresh CUDA context and a mode that runs out
of memory (or crashes, or overruns) is reported as such in the table while the suite goes on. Jobs run in priority
order under a wall-clock budget (default 480 s); what the budget leaves out is listed as skipped. Writes
``RESULTS-gpu.md`` and ``RESULTS-gpu.json`` and prints the target table last.

    bash benchmarks/gpu_suite.sh                       # on one H100 / H200: Llama-3-8B / Vicuna-7B shapes, <= 8 min
    python benchmarks/gpu_suite.py --dry-run --out-dir runs/gpu_dry   # CPU, tiny shapes, the same code path
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Optional

import benchlib

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_MODES = ("hybrid", "region", "full", "lora_all", "lora_region", "qlora_region")
QUANTIZED = ("hybrid", "qlora_region")
LOSS_CHUNK = 256  # the hybrid again with the loss over the vocabulary in chunks (vr-plugin train --loss_chunk)
GB = 1e9


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """Command line of the suite (``--job`` is the per-process entry the suite itself uses)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: every job kind, in seconds")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (implied by --dry-run)")
    parser.add_argument("--out-dir", help="where RESULTS-gpu.md/.json go (default: benchmarks/; dry run: runs/gpu_dry)")
    parser.add_argument("--budget-s", type=float, help="wall-clock budget of the whole suite (default 480; dry 300)")
    parser.add_argument("--job-timeout-s", type=float, default=180.0, help="the most one job may take")
    parser.add_argument("--groups", help="comma-separated subset of the job groups (default: all, in order)")
    parser.add_argument("--steps", type=int, help="timed train steps per job (default 3; dry run 1)")
    parser.add_argument("--workdir", help="where the base checkpoints go (default: a temp dir; 16 GB at 8B)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--job-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tiny = args.tiny or args.dry_run
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    args.budget_s = args.budget_s or (300.0 if args.tiny else 480.0)
    args.steps = args.steps or (1 if args.tiny else 3)
    default_out = os.path.join(os.path.dirname(HERE), "runs", "gpu_dry") if args.tiny else HERE
    args.out_dir = args.out_dir or default_out
    known = [name for name, _ in job_groups(args)]
    args.groups = [g.strip() for g in args.groups.split(",")] if args.groups else known
    bad = [g for g in args.groups if g not in known]
    if bad:
        parser.error(f"--groups {','.join(bad)} not among {', '.join(known)}")
    return args


# --------------------------------------------------------------------------------------------------------------
# The plan


def attentions(args: argparse.Namespace) -> list:
    """SDPA, plus flash-attn 2 where it is installed; a dry run switches to ``eager`` in its place, so that the
    attention switch runs on CPU."""
    if args.tiny:
        return ["sdpa", "eager"]
    second = ["flash_attention_2"] if importlib.util.find_spec("flash_attn") is not None else []
    return ["sdpa", *second]


def train_jobs(
    group: str, preset: str, attention: str, gc: bool, modes: tuple = TRAIN_MODES, loss_chunk: Optional[int] = None
) -> list:
    """One job per mode; the quantized modes need the preset's base checkpoint, saved by a job of its own (reused
    when an earlier group saved it). ``loss_chunk``: the loss in chunks of that many positions (vr_plugin.loss)."""
    jobs = []
    for mode in modes:
        if mode in QUANTIZED and not any(j["kind"] == "save_base" for j in jobs):
            jobs.append({"kind": "save_base", "group": group, "preset": preset})
        job = {"kind": "train", "group": group, "preset": preset, "mode": mode, "attention": attention, "gc": gc}
        jobs.append({**job, "loss_chunk": loss_chunk} if loss_chunk else job)
    return jobs


def job_groups(args: argparse.Namespace) -> list:
    """``(name, jobs)`` in priority order: the targets first (8B, SDPA, checkpointing), then the inference runs,
    then checkpointing off, flash-attn 2, the 7B shape."""
    big, small = ("tiny", "tiny") if args.tiny else ("llama3-8b", "vicuna-7b")
    sdpa, *others = attentions(args)
    # a dry run checks each switch on one or two modes (every mode runs in "targets"): a process per job costs
    # seconds of imports on CPU
    switched = ("region",) if args.tiny else TRAIN_MODES
    groups = [
        ("targets", train_jobs("targets", big, sdpa, True)),
        ("inference", [{"kind": k, "group": "inference", "preset": small} for k in ("prune", "score")]),
        ("no_checkpointing", train_jobs("no_checkpointing", big, sdpa, False, switched)),
        ("loss_chunk", train_jobs("loss_chunk", big, sdpa, True, ("hybrid",), loss_chunk=LOSS_CHUNK)),
    ]
    for attention in others:
        modes = ("region", "hybrid") if args.tiny else TRAIN_MODES
        groups.append((f"{attention}", train_jobs(attention, big, attention, True, modes)))
    if args.tiny:  # a real out-of-memory inside one job: reported, the suite goes on
        groups.append(("oom_probe", [{**train_jobs("oom_probe", big, sdpa, True, ("full",))[0], "cap_mib": 1}]))
    else:
        groups.append(("vicuna-7b", train_jobs("vicuna-7b", small, sdpa, True)))
    return groups


def job_label(job: dict) -> str:
    """A short readable name of a job."""
    if job["kind"] != "train":
        return f"{job['kind']} {job['preset']}"
    chunk = f" loss_chunk={job['loss_chunk']}" if job.get("loss_chunk") else ""
    return f"{job['mode']} {job['preset']} {job['attention']} gc={'on' if job['gc'] else 'off'}{chunk}"


# --------------------------------------------------------------------------------------------------------------
# One job (its own process)


def train_argv(job: dict, args: argparse.Namespace) -> list:
    """``train_step.py`` flags for one train job: its settings are parsed by the benchmark's own parser."""
    return [
        "--device",
        args.device,
        "--preset",
        job["preset"],
        "--modes",
        job.get("mode", "full"),
        "--steps",
        str(args.steps),
        "--warmup",
        "1",
        "--dtype",
        "bfloat16",
        "--gradient-checkpointing" if job.get("gc", True) else "--no-gradient-checkpointing",
        "--no-isolate",
        "--no-interleave",
    ]


def set_attention(model: Any, attention: str) -> str:
    """Switch the model (every sub-model: LLM and vision tower) to ``attention``; the LLM's implementation after."""
    from vr_plugin.locate import unwrap_model

    core = unwrap_model(model)
    if getattr(core.config, "_attn_implementation", None) != attention:
        core.set_attn_implementation(attention)
    text = getattr(core.config, "text_config", core.config)
    return str(getattr(text, "_attn_implementation", attention))


def apply_cap(job: dict, device: str) -> None:
    """``cap_mib``: a real memory ceiling for this process (CUDA: the allocator's fraction of the card; CPU: the
    address space above what is mapped now), so that an allocation past it fails as on a smaller card."""
    cap = job.get("cap_mib")
    if not cap:
        return
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**20 / total))
        return
    import resource

    with open("/proc/self/status", encoding="ascii") as handle:
        size = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + int(cap * 2**20), resource.RLIM_INFINITY))


def timed_step(model: Any, optimizer: Any, batch: dict, device: str) -> dict:
    """Forward + backward + optimizer step; seconds per phase."""
    benchlib.sync(device)
    t0 = benchlib.now()
    loss = model(**batch).loss
    benchlib.sync(device)
    t1 = benchlib.now()
    loss.backward()
    benchlib.sync(device)
    t2 = benchlib.now()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    benchlib.sync(device)
    t3 = benchlib.now()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0, "loss": float(loss)}


def train_job(job: dict, args: argparse.Namespace, model_dir: Optional[str]) -> dict:
    """Build one mode with ``train_step.build_mode`` (vr_plugin's region / LoRA / quantized loading), set the
    attention, warm up, then time the steps under the peak meter."""
    import torch
    import train_step

    from vr_plugin.loss import chunked_loss

    step_args = train_step.parse_args(train_argv(job, args))
    shape = benchlib.resolve_shape(step_args)
    benchlib.setup_process(step_args)
    memory = benchlib.Memory(args.device)
    benchlib.collect()
    base = memory.current()
    apply_cap(job, args.device)
    model, optimizer = train_step.build_mode(job["mode"], step_args, shape, model_dir)
    used = set_attention(model, job["attention"])
    batch = benchlib.cast_floats(benchlib.make_batch(shape, device=args.device), torch.bfloat16)
    model.train()
    with chunked_loss(model, job["loss_chunk"]) if job.get("loss_chunk") else contextlib.nullcontext():
        warm = timed_step(model, optimizer, batch, args.device)
        setup_peak, setup_reserved = memory.peak() - base, memory.peak_reserved()
        memory.reset_peak()
        steps = [timed_step(model, optimizer, batch, args.device) for _ in range(args.steps)]
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "attention_used": used,
        "shape": shape.describe(),
        "step_s": benchlib.median([s["step"] for s in steps]),
        **{f"{k}_s": benchlib.median([s[k] for s in steps]) for k in ("forward", "backward", "optimizer")},
        "warmup_step_s": warm["step"],
        "samples_s": [s["step"] for s in steps],
        "peak_bytes": memory.peak() - base,
        "reserved_bytes": memory.peak_reserved(),
        "setup_peak_bytes": setup_peak,
        "setup_reserved_bytes": setup_reserved,
        "trainable": sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
        "optimizer": type(optimizer).__name__,
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in states),
        "loss": steps[-1]["loss"],
    }


def bench_argv(job: dict, args: argparse.Namespace, out: str) -> list:
    """Flags for ``prune_latency.py`` / ``score_cost.py`` (short repeats: the suite has a budget)."""
    common = ["--device", args.device, "--preset", job["preset"], "--out", out]
    if job["kind"] == "prune":
        extra = ["--remove", "1,2" if args.tiny else "1,2,4,8", "--new-tokens", "3" if args.tiny else "32"]
        return common + extra + ["--repeats", "1" if args.tiny else "3"]
    # --no-isolate: score_cost would fork its memory runs, and a fork after CUDA is initialised cannot use CUDA
    return common + ["--batches", "1" if args.tiny else "2", "--repeats", "1" if args.tiny else "3", "--no-isolate"]


def run_job_here(job: dict, args: argparse.Namespace) -> dict:
    """The body of a job process: dispatch on the job's kind; exceptions become an ``error`` (``OOM`` for an
    out-of-memory one)."""
    model_dir = os.path.join(args.workdir, f"base-{job['preset']}") if args.workdir else None
    try:
        if job["kind"] == "save_base":
            import train_step

            step_args = train_step.parse_args(train_argv(job, args))
            benchlib.setup_process(step_args)
            train_step.save_base(benchlib.resolve_shape(step_args), step_args, model_dir)
            result: dict = {"model_dir": model_dir}
        elif job["kind"] == "train":
            result = train_job(job, args, model_dir)
        else:
            module = __import__("prune_latency" if job["kind"] == "prune" else "score_cost")
            out = args.job_out + ".report.json"
            result = {"report": module.main(bench_argv(job, args, out))}
        return {"ok": True, "result": result, "device_info": device_info(args.device)}
    except BaseException as error:  # noqa: BLE001 - SystemExit from a benchmark's own checks too
        return {"ok": False, "error": describe_error(error), "traceback": traceback.format_exc()[-4000:]}


def describe_error(error: BaseException) -> str:
    """``OOM`` for an allocation failure (CUDA or host), else the exception's type and first line."""
    text = str(error)
    lowered = text.lower()
    oom = isinstance(error, MemoryError) or "OutOfMemoryError" in type(error).__name__
    oom = oom or "out of memory" in lowered or "can't allocate memory" in lowered
    return "OOM" if oom else f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def device_info(device: str) -> dict:
    """CUDA device, CUDA runtime, flash-attn version, as seen inside the job (the parent never touches CUDA)."""
    import torch

    info = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, gpu_total_bytes=props.total_memory, capability=list(torch.cuda.get_device_capability(0))
        )
    try:
        from importlib import metadata

        info["flash_attn"] = metadata.version("flash-attn")
    except Exception:  # noqa: BLE001 - not installed
        info["flash_attn"] = None
    return info


def job_main(args: argparse.Namespace) -> int:
    """``--job``: run one job and write its outcome as JSON to ``--job-out``; exit 0 whatever the job did."""
    job = json.loads(args.job)
    started = time.perf_counter()
    outcome = run_job_here(job, args)
    outcome["wall_s"] = time.perf_counter() - started
    with open(args.job_out, "w", encoding="utf-8") as handle:
        json.dump(outcome, handle, default=str)
    return 0


# --------------------------------------------------------------------------------------------------------------
# The driver


def spawn(job: dict, args: argparse.Namespace, workdir: str, index: int, timeout: float) -> dict:
    """Run ``job`` in a fresh Python process (its own session, killed whole on timeout); its outcome."""
    out = os.path.join(workdir, f"job-{index:02d}.json")
    log = os.path.join(workdir, f"job-{index:02d}.log")
    argv = [sys.executable, os.path.abspath(__file__), "--job", json.dumps(job), "--job-out", out]
    argv += ["--device", args.device, "--workdir", workdir, "--steps", str(args.steps)] + (
        ["--tiny"] if args.tiny else []
    )
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen(argv, cwd=HERE, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    outcome = {"ok": False, "wall_s": time.perf_counter() - started}
    if os.path.exists(out):
        with open(out, encoding="utf-8") as handle:
            outcome = json.load(handle)
    elif code is None:
        outcome["error"] = f"timeout after {timeout:.0f} s"
    else:
        why = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
        outcome["error"] = f"crashed ({why}{', out of host memory?' if code == -9 else ''}) without a result"
    if not outcome.get("ok"):
        with open(log, encoding="utf-8", errors="replace") as handle:
            outcome["log_tail"] = handle.read()[-3000:]
    return outcome


def run_suite(args: argparse.Namespace, workdir: str) -> list:
    """Every job of the chosen groups in order, each in its own process, under the budget; one record per job."""
    started = time.perf_counter()
    records, index = [], 0
    for name, jobs in job_groups(args):
        if name not in args.groups:
            continue
        for job in jobs:
            index += 1
            record = {"job": job, "label": job_label(job)}
            left = args.budget_s - (time.perf_counter() - started)
            needs_base = job["kind"] == "train" and job["mode"] in QUANTIZED
            base_failed = needs_base and not any(
                r["job"]["kind"] == "save_base" and r["job"]["preset"] == job["preset"] and r.get("ok") for r in records
            )
            saved = any(
                r["job"]["kind"] == "save_base" and r["job"]["preset"] == job["preset"] and r.get("ok") for r in records
            )
            if job["kind"] == "save_base" and saved:
                record.update(ok=True, reused=True)
            elif left < (1 if args.tiny else 20):
                record.update(ok=False, skipped=True, error=f"skipped: {args.budget_s:g} s budget spent")
            elif base_failed:
                record.update(ok=False, skipped=True, error="skipped: no base checkpoint")
            else:
                print(f"[gpu_suite] {record['label']} ({left:.0f} s left) ...", file=sys.stderr, flush=True)
                record.update(spawn(job, args, workdir, index, min(left, args.job_timeout_s)))
                print(f"[gpu_suite]   {'ok' if record.get('ok') else record.get('error')}", file=sys.stderr, flush=True)
            records.append(record)
    return records


def main(argv: Optional[list] = None) -> dict:
    """Run the suite (or, with ``--job``, one job of it) and write the report."""
    args = parse_args(argv)
    if args.job:
        sys.exit(job_main(args))
    info = benchlib.machine(args.device)
    info["flash_attn_installed"] = importlib.util.find_spec("flash_attn") is not None
    started = time.perf_counter()
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vr_gpu_suite_", dir=args.workdir) as workdir:
        records = run_suite(args, workdir)
    info["loadavg_end"] = benchlib.loadavg()
    report = build_report(records, info, args, time.perf_counter() - started)
    write_report(report, args.out_dir)
    print(render(report))
    print("\n" + render_targets(report["targets"]))
    return report


# --------------------------------------------------------------------------------------------------------------
# The report


BYTE_KEYS = ("peak_bytes", "reserved_bytes", "setup_peak_bytes", "setup_reserved_bytes", "optimizer_state_bytes")


def train_rows(records: list) -> list:
    """One row per train job, with its ratios to full tuning and all-layer LoRA of the same group."""
    rows = []
    for record in records:
        job = record["job"]
        if job["kind"] != "train":
            continue
        row = {key: job[key] for key in ("group", "preset", "mode", "attention", "gc")}
        row["loss_chunk"] = job.get("loss_chunk")
        row["status"] = "ok" if record.get("ok") else record.get("error", "failed")
        result = record.get("result") or {}
        for key in ("step_s", "forward_s", "backward_s", "optimizer_s", "trainable", "optimizer", "attention_used"):
            row[key] = result.get(key)
        for key in (
            "peak_bytes",
            "reserved_bytes",
            "setup_peak_bytes",
            "setup_reserved_bytes",
            "optimizer_state_bytes",
        ):
            value = result.get(key)
            row[key.replace("_bytes", "_gb")] = value / GB if value is not None else None
        rows.append(row)
    for row in rows:
        same = {r["mode"]: r for r in rows if r["group"] == row["group"] and r["status"] == "ok"}
        for ref in ("full", "lora_all"):
            base = same.get(ref, {}).get("step_s")
            row[f"time_vs_{ref}"] = benchlib.ratio(row["step_s"], base) if row["status"] == "ok" else None
    return rows


def sub_report(records: list, kind: str) -> Optional[dict]:
    """The JSON report of the prune / score job, or ``None``."""
    for record in records:
        if record["job"]["kind"] == kind and record.get("ok"):
            return record["result"]["report"]
    return None


def suite_targets(rows: list, prune: Optional[dict], score: Optional[dict]) -> list:
    """The issue's targets from the ``targets`` group (8B shape, SDPA, checkpointing) and the inference runs."""
    by_mode = {r["mode"]: r for r in rows if r["group"] == "targets"}

    def value(mode: str, key: str) -> Optional[float]:
        row = by_mode.get(mode, {})
        return row.get(key) if row.get("status") == "ok" else None

    targets = [
        benchlib.target("region full-parameter step time / full tuning", value("region", "time_vs_full"), 0.80),
        benchlib.target("region LoRA step time / all-layer LoRA", value("lora_region", "time_vs_lora_all"), 0.85),
        benchlib.target("hybrid peak max_memory_allocated, GB (24 GB card)", value("hybrid", "peak_gb"), 22),
        benchlib.target("hybrid peak max_memory_reserved, GB (24 GB card)", value("hybrid", "reserved_gb"), 22),
        benchlib.target(
            "region full-parameter bf16 peak reserved, GB (80 GB card)", value("region", "reserved_gb"), 80
        ),
    ]
    for name, report in (("pruned decode", prune), ("score_layers", score)):
        if report is None:
            targets.append({"target": f"{name}: not measured", "measured": None, "limit": "", "met": None})
        else:
            targets.extend(report["targets"])
    failed = {m: r["status"] for m, r in by_mode.items() if r["status"] != "ok"}
    for target in targets[:5]:  # a failed mode is reported with its reason (OOM, skipped ...), not as a number
        mode = {"region": "region", "hybrid": "hybrid"}.get(target["target"].split()[0], "lora_region")
        if target["measured"] is None and mode in failed:
            target["measured"] = failed[mode]
    chunked = next((r for r in rows if r["group"] == "loss_chunk" and r["mode"] == "hybrid"), None)
    if chunked is not None:  # beside the hybrid's own rows, before the inference targets
        name = f"hybrid + loss_chunk {LOSS_CHUNK} peak max_memory_allocated, GB (24 GB card)"
        row = benchlib.target(name, chunked["peak_gb"] if chunked["status"] == "ok" else None, 22)
        targets.insert(5, row if chunked["status"] == "ok" else {**row, "measured": chunked["status"]})
    return targets


def build_report(records: list, info: dict, args: argparse.Namespace, wall_s: float) -> dict:
    """Everything the suite measured, as one JSON-able dict."""
    rows = train_rows(records)
    prune, score = sub_report(records, "prune"), sub_report(records, "score")
    devices = [r["device_info"] for r in records if r.get("device_info")]
    return {
        "benchmark": "gpu_suite",
        "dry_run": bool(args.tiny),
        "device": args.device,
        "machine": info,
        "device_info": devices[0] if devices else None,
        "wall_s": wall_s,
        "budget_s": args.budget_s,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "train_rows": rows,
        "prune": prune,
        "score": score,
        "jobs": [
            {k: r.get(k) for k in ("label", "job", "ok", "error", "skipped", "wall_s", "log_tail")} for r in records
        ],
        "targets": suite_targets(rows, prune, score),
    }


TRAIN_COLUMNS = [
    ("group", "group"),
    ("preset", "shape"),
    ("mode", "mode"),
    ("attention_used", "attention"),
    ("gc", "checkpointing"),
    ("status", "status"),
    ("step_s", "step s"),
    ("time_vs_full", "time / full"),
    ("time_vs_lora_all", "time / LoRA-all"),
    ("forward_s", "fwd s"),
    ("backward_s", "bwd s"),
    ("optimizer_s", "opt s"),
    ("peak_gb", "peak alloc GB"),
    ("reserved_gb", "peak reserved GB"),
    ("setup_peak_gb", "alloc GB incl. load + warm-up"),
    ("trainable", "trainable"),
    ("optimizer", "optimizer"),
    ("optimizer_state_gb", "opt state GB"),
]
PRUNE_COLUMNS = [
    ("k", "k removed"),
    ("removed", "removed"),
    ("ideal", "ideal L/(L−k)"),
    ("decode_tokens_per_s", "decode tok/s"),
    ("decode_vs_ideal", "decode / ideal"),
    ("prefill_ms", "prefill ms"),
]


def render_targets(targets: list) -> str:
    """The target table, printed last."""
    return "Targets:\n\n" + benchlib.target_rows(targets)


def render(report: dict) -> str:
    """RESULTS-gpu.md."""
    info, device = report["machine"], report.get("device_info") or {}
    where = f"GPU {device.get('gpu')} (CUDA {device.get('cuda_runtime')})" if device.get("gpu") else report["device"]
    lines = [
        "# GPU suite results",
        "",
        "**Dry run (CPU, tiny shapes): the numbers only show that every job and the report work.**"
        if report["dry_run"]
        else "Measured by `bash benchmarks/gpu_suite.sh` (random weights of the real shapes, built on the device).",
        "",
        f"{report['date']}; {where}; {benchlib.machine_line(info)}; flash-attn {device.get('flash_attn')}; "
        f"wall {report['wall_s']:.0f} s of a {report['budget_s']:g} s budget. GB = 10^9 bytes; peaks are "
        "torch.cuda.max_memory_allocated / max_memory_reserved over the timed steps (on CPU: peak RSS).",
        "",
        "## Training step (bf16, seq 2048, batch 1, each job in its own process)",
        "",
        benchlib.markdown_table(report["train_rows"], TRAIN_COLUMNS),
    ]
    prune, score = report.get("prune"), report.get("score")
    lines += ["", "## Pruned decode", ""]
    lines.append(benchlib.markdown_table(prune["rows"], PRUNE_COLUMNS) if prune else "not measured")
    lines += ["", "## score_layers cost vs a forward", ""]
    if score:
        columns = [("what", "pass"), ("seconds", "seconds"), ("ratio", "/ forward")]
        lines.append(benchlib.markdown_table(score["time_rows"], columns))
    else:
        lines.append("not measured")
    problems = [j for j in report["jobs"] if not j.get("ok")]
    if problems:
        lines += ["", "## Not measured", ""] + [f"- {j['label']}: {j.get('error')}" for j in problems]
    lines += ["", "## " + render_targets(report["targets"])]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str) -> tuple:
    """``RESULTS-gpu.md`` and ``RESULTS-gpu.json`` in ``out_dir``; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, "RESULTS-gpu.md"), os.path.join(out_dir, "RESULTS-gpu.json")
    with open(md, "w", encoding="utf-8") as handle:
        handle.write(render(report))
    with open(js, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, default=str)
    return md, js


if __name__ == "__main__":
    main()
