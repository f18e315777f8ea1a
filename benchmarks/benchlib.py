"""Shared pieces of the benchmark scripts: model shapes, synthetic LVLM batches, isolation, timing, memory, output.

The scripts import this module by name (``python benchmarks/<script>.py`` puts ``benchmarks/`` on ``sys.path``).
Everything heavy (torch, transformers) is imported lazily, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

MIB = 2**20

# --------------------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shape:
    """An LVLM (LLaVA layout: CLIP-style vision tower, 2-layer MLP projector, Llama-family LLM) and its workload."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch: int
    seq: int  # tokens per sample, image tokens included
    batch: int
    lora_r: int
    lora_alpha: int
    rope_theta: float = 10000.0

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2  # LLaVA's "default" feature strategy drops CLS

    @property
    def image_token_id(self) -> int:
        return self.vocab - 1

    def describe(self) -> str:
        return (
            f"{self.name}: LLM {self.layers} layers, hidden {self.hidden}, MLP {self.intermediate}, "
            f"{self.heads} heads ({self.kv_heads} KV), vocab {self.vocab}; vision {self.vision_layers} layers x "
            f"{self.vision_hidden}, {self.image_tokens} image tokens; batch {self.batch} x seq {self.seq}; "
            f"LoRA r={self.lora_r} (r/hidden = 1/{self.hidden // self.lora_r})"
        )


# CPU default: LLaVA-1.5-7B (Vicuna-7B + CLIP ViT-L/14-336) at 1/16 of the width, every proportion that sets a
# ratio kept: 32 layers, MLP/hidden 2.6875, multi-head attention, LoRA r/hidden 1/32 (r=128 at 4096), lm_head at
# 0.65 of a layer (vocab 32000 x 4096 vs 202M per layer), attention at ~8% of a layer's FLOPs (seq/hidden 1/2 as
# 2048/4096), image tokens at 28% of the sequence (576/2048). README.md explains the choice.
CPU = Shape(
    name="cpu",
    layers=32,
    hidden=256,
    intermediate=688,
    heads=4,
    kv_heads=4,
    vocab=2000,
    vision_hidden=128,
    vision_layers=2,
    vision_heads=2,
    vision_intermediate=512,
    image_size=48,
    patch=8,
    seq=128,
    batch=4,
    lora_r=8,
    lora_alpha=16,
)
# Smoke tests: seconds per script.
TINY = dataclasses.replace(
    CPU,
    name="tiny",
    layers=8,
    hidden=64,
    intermediate=172,
    heads=2,
    kv_heads=2,
    vocab=300,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate=64,
    image_size=16,
    patch=8,
    seq=16,
    batch=1,
    lora_r=2,
    lora_alpha=4,
)
# Real sizes (GPU): random-initialised layers of the real shapes, CLIP ViT-L/14-336 vision tower (576 tokens).
_CLIP_L_336 = dict(
    vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096, image_size=336, patch=14
)
VICUNA_7B = Shape(
    name="vicuna-7b",
    layers=32,
    hidden=4096,
    intermediate=11008,
    heads=32,
    kv_heads=32,
    vocab=32000,
    seq=2048,
    batch=1,
    lora_r=128,
    lora_alpha=256,
    **_CLIP_L_336,
)
LLAMA3_8B = Shape(
    name="llama3-8b",
    layers=32,
    hidden=4096,
    intermediate=14336,
    heads=32,
    kv_heads=8,
    vocab=128256,
    seq=2048,
    batch=1,
    lora_r=128,
    lora_alpha=256,
    rope_theta=500000.0,
    **_CLIP_L_336,
)
PRESETS = {shape.name: shape for shape in (TINY, CPU, VICUNA_7B, LLAMA3_8B)}


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--preset``, ``--quick`` and size flags overriding single fields of the preset."""
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="model shape: 'cpu' (default on cpu), 'llama3-8b' (default on cuda), 'vicuna-7b', 'tiny'",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: the 'tiny' preset, few repeats, in-process")
    parser.add_argument("--layers", type=int, help="LLM decoder layers (GPU: as many as fit)")
    parser.add_argument("--hidden", type=int, help="LLM hidden size (also sets MLP size by the preset's ratio)")
    parser.add_argument("--seq", type=int, help="tokens per sample, image tokens included")
    parser.add_argument("--batch", type=int, help="samples per batch")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (default: hidden/32, as r=128 at 4096)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", help="write the results as JSON here")


def resolve_shape(args: argparse.Namespace) -> Shape:
    """The preset named by the arguments with the size flags applied."""
    name = args.preset or ("tiny" if args.quick else "llama3-8b" if args.device == "cuda" else "cpu")
    shape = PRESETS[name]
    changes: dict = {}
    if args.layers:
        changes["layers"] = args.layers
    if args.hidden:
        ratio = shape.intermediate / shape.hidden
        head_dim = shape.hidden // shape.heads
        heads = max(1, args.hidden // head_dim)
        changes.update(
            hidden=args.hidden,
            intermediate=int(round(args.hidden * ratio)),
            heads=heads,
            kv_heads=max(1, heads * shape.kv_heads // shape.heads),
            lora_r=max(1, args.hidden // 32),
            lora_alpha=2 * max(1, args.hidden // 32),
        )
    if args.seq:
        changes["seq"] = args.seq
    if args.batch:
        changes["batch"] = args.batch
    if args.lora_r:
        changes.update(lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    shape = dataclasses.replace(shape, **changes) if changes else shape
    if shape.seq <= shape.image_tokens + 1:
        raise SystemExit(f"--seq {shape.seq} leaves no text after bos and {shape.image_tokens} image tokens")
    return shape


def lvlm_config(shape: Shape) -> Any:
    """A ``LlavaConfig`` of ``shape``, built by :func:`vr_plugin.tiny.build_config`."""
    from vr_plugin.tiny import build_config

    text = dict(
        vocab_size=shape.vocab,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(4096, 2 * shape.seq),
        rope_theta=shape.rope_theta,
    )
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch,
    )
    return build_config(
        "llava",
        shape.layers,
        shape.hidden,
        text_overrides=text,
        vision_config=vision,
        image_token_index=shape.image_token_id,
    )


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_lvlm(shape: Shape, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> Any:
    """A randomly initialised ``LlavaForConditionalGeneration`` of ``shape``, built directly on ``device``."""
    import torch
    import transformers

    config = lvlm_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlavaForConditionalGeneration._from_config(config, dtype=torch_dtype(dtype))
    return model


def freeze_vision_tower(model: Any) -> None:
    """LLaVA's stage 2 keeps the vision tower frozen in every mode."""
    from vr_plugin.locate import map_parameters

    for info in map_parameters(model):
        if info.group == "vision":
            info.param.requires_grad_(False)


def make_batch(shape: Shape, seed: int = 0, labels: bool = True, batch: Optional[int] = None, device: str = "cpu"):
    """``batch`` samples of ``[bos] <image tokens> <random text>`` with random pixels; labels mask the image."""
    import torch

    n = batch or shape.batch
    generator = torch.Generator().manual_seed(seed)
    text_len = shape.seq - 1 - shape.image_tokens
    ids = torch.cat(
        [
            torch.ones(n, 1, dtype=torch.long),
            torch.full((n, shape.image_tokens), shape.image_token_id),
            torch.randint(3, shape.image_token_id - 1, (n, text_len), generator=generator),
        ],
        dim=1,
    )
    out = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(n, 3, shape.image_size, shape.image_size, generator=generator),
    }
    if labels:
        out["labels"] = torch.where(ids == shape.image_token_id, torch.full_like(ids, -100), ids)
    return {k: v.to(device) for k, v in out.items()}


def cast_floats(batch: dict, dtype: Any) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------
# Process setup, isolation, timing, memory


def set_malloc_mmap_threshold(threshold: int = 65536) -> bool:
    """``mallopt(M_MMAP_THRESHOLD)``: what ``MALLOC_MMAP_THRESHOLD_=65536`` does, set from inside the process.

    Large tensors then live in their own mappings and go back to the OS when freed, so the peak RSS tracks live
    memory. Returns whether it was applied (glibc only).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def setup_process(args: argparse.Namespace) -> None:
    """Quiet logs and progress bars, the thread count."""
    os.environ.setdefault("VR_PLUGIN_LOG_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass
    logging.getLogger("vr_plugin").setLevel(logging.WARNING)
    if args.quick and not args.threads:
        args.threads = 1  # tiny ops: one thread is faster and steadier than two contending ones
    if args.threads:
        torch.set_num_threads(args.threads)


def preload(*modules: str) -> None:
    """Import now, in the parent, what the measured children will use: a library imported inside a child would
    count towards that child's memory (peft, bitsandbytes and the torch._dynamo it pulls in are 100+ MiB)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def run_isolated(isolate: bool, fn: Callable, *args: Any, **kwargs: Any) -> dict:
    """Run ``fn(*args, **kwargs)`` in a forked child process (``isolate``) or here; ``{"ok", "result" | "error"}``.

    Forking keeps the already imported libraries (no second import of torch) while every measurement gets a
    fresh heap (and on GPU a fresh CUDA context). The parent must not have run torch ops or touched CUDA yet.
    """
    if not isolate or sys.platform != "linux":
        return _call(fn, args, kwargs)
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, fn, args, kwargs))
    process.start()
    sender.close()
    try:
        outcome = receiver.recv()
    except EOFError:
        outcome = None
    process.join()
    if outcome is None:
        code = process.exitcode
        why = "killed (out of memory?)" if code is not None and code < 0 else f"exited with {code}"
        outcome = {"ok": False, "error": f"child process {why} without a result"}
    return outcome


def _call(fn: Callable, args: tuple, kwargs: dict) -> dict:
    try:
        return {"ok": True, "result": fn(*args, **kwargs)}
    except Exception as error:  # reported in the table instead of aborting the whole benchmark
        kind = type(error).__name__
        oom = "OutOfMemoryError" in kind or "out of memory" in str(error).lower()
        return {
            "ok": False,
            "error": "OOM" if oom else f"{kind}: {str(error).splitlines()[0][:300] if str(error) else ''}",
            "traceback": traceback.format_exc()[-3000:],
        }


def _child(sender: Any, fn: Callable, args: tuple, kwargs: dict) -> None:
    outcome = _call(fn, args, kwargs)
    sender.send(outcome)
    sender.close()


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """``numerator / denominator``, or ``None`` when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def median(values: list) -> float:
    return float(statistics.median(values)) if values else float("nan")


class Memory:
    """Peak-memory meter: ``torch.cuda.max_memory_allocated`` on GPU, peak RSS (``/proc``) on CPU; bytes."""

    def __init__(self, device: str):
        self.device = device

    def current(self) -> int:
        if self.device == "cuda":
            import torch

            return int(torch.cuda.memory_allocated())
        from vr_plugin._memory import rss_bytes

        return rss_bytes()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            from vr_plugin._memory import reset_peak_rss

            reset_peak_rss()

    def peak(self) -> int:
        if self.device == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated())
        from vr_plugin._memory import peak_rss_bytes

        return peak_rss_bytes()

    def peak_reserved(self) -> Optional[int]:
        """GPU: the caching allocator's peak reservation (what the card must hold); CPU: ``None``."""
        if self.device == "cuda":
            import torch

            return int(torch.cuda.max_memory_reserved())
        return None


def collect() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_initialized():  # never initialise CUDA here: the parent forks CUDA children
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


# --------------------------------------------------------------------------------------------------------------
# Machine description and output


def loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def machine(device: str) -> dict:
    """What the numbers were measured on: CPU, core count, load average, library versions, GPU."""
    import torch
    import transformers

    info: dict = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": loadavg(),
        "memory_gib": _mem_total_gib(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    from importlib import metadata

    for name in ("peft", "bitsandbytes"):  # versions without importing them (bitsandbytes pulls in torch._dynamo)
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    if device == "cuda":
        info.update(_gpu())
    return info


def _gpu() -> dict:
    """GPU name and memory from ``nvidia-smi``: asking torch would initialise CUDA in the parent, and CUDA does not
    survive the fork that starts each measurement."""
    import subprocess

    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.splitlines()[0]
        name, total, driver = (part.strip() for part in line.split(","))
        return {"gpu": name, "gpu_memory_gib": round(float(total) / 1024, 1), "gpu_driver": driver}
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return {"gpu": "unknown (no nvidia-smi)", "gpu_memory_gib": None}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_line(info: dict) -> str:
    """One markdown line naming the machine and the load it was under."""
    where = f"GPU {info['gpu']} ({info['gpu_memory_gib']} GiB), " if info.get("gpu") else ""
    load = info.get("loadavg_start")
    end = info.get("loadavg_end")
    return (
        f"Machine: {where}{info['cpu']}, nproc {info['nproc']}, torch threads {info['torch_threads']}, "
        f"{info.get('memory_gib')} GiB RAM; load average (1/5/15 min) at start {load}, at end {end}; "
        f"torch {info['torch']}, transformers {info['transformers']}, peft {info.get('peft')}, "
        f"bitsandbytes {info.get('bitsandbytes')}"
    )


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # nan
            return "–"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list, columns: list) -> str:
    """``columns``: ``(key, header)`` pairs; cells formatted by :func:`fmt`."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def target_rows(targets: list) -> str:
    """Markdown table of ``{"target", "measured", "limit", "met"}`` dicts."""
    columns = [("target", "target"), ("measured", "measured"), ("limit", "limit"), ("met", "met")]
    return markdown_table(targets, columns)


def target(name: str, measured: Optional[float], limit: float, higher_is_better: bool = False) -> dict:
    if measured is None or measured != measured:
        met = None
    else:
        met = measured >= limit if higher_is_better else measured <= limit
    sign = "≥" if higher_is_better else "≤"
    return {"target": name, "measured": measured, "limit": f"{sign} {limit:g}", "met": met}


def finish(report: dict, text: str, out: Optional[str]) -> None:
    """Print the markdown report and write the JSON one."""
    report["machine"]["loadavg_end"] = loadavg()
    header = machine_line(report["machine"])
    print(header)
    print()
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, default=str)
        print(f"\nJSON written to {out}", file=sys.stderr)


def now() -> float:
    return time.perf_counter()


def cpu_now() -> float:
    """CPU seconds of this process (all threads, user + system): with one thread, the work done, whatever else
    the machine runs; a check on wall times taken on a shared machine."""
    return time.process_time()
