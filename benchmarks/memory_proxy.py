"""CPU proxy for the 8B memory targets: the real training step at Llama-3-8B widths, a few layers deep, fitted.

Each configuration (mode, depth, region layers, sequence) builds an LVLM of the real Llama-3-8B widths (hidden 4096,
MLP 14336, 32/8 heads, vocab 128256) with a CLIP-L-sized vision tower, in its own forked process, and runs one
training step exactly as ``train_step.py`` builds it (``train_step.build_mode``: ``apply_visual_region``;
``load_for_region(..., "nf4")`` with bitsandbytes' 8-bit AdamW for the hybrid), bf16, gradient checkpointing on.
The optimizer state is allocated first (one step on zero gradients), so the measured step holds weights, optimizer
state, gradients and activations at once, as every later step does. Per configuration: resident bytes at rest and
the peak RSS of the step above the bare interpreter (malloc returning freed tensors to the OS), against the
analytic floor (weights + gradients + optimizer state + checkpointed layer inputs + logits).

Per mode a least-squares fit ``peak = c0 + c_frozen * frozen layers + c_region * region layers`` over the measured
configurations, with its residuals, extrapolated to 32 layers with the ``uniform_0.25`` region (24 frozen, 8 in the
region); a measured sequence probe carries it from the proxy's sequence to 2048. Prints markdown, writes JSON.

    python benchmarks/memory_proxy.py --out runs/memory_proxy.json     # ~15-20 min on 2 cores, <= ~9 GiB a process
    python benchmarks/memory_proxy.py --tiny                           # seconds: the same code at toy widths
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any, Optional

import benchlib

GB = 1e9  # cards are sold in GB; the 22 GB target leaves 2 GB of a 24 GB card to CUDA context and workspace
TARGET_GB = 22.0
TARGET_LAYERS, TARGET_SEQ = 32, 2048
MODES = ("hybrid", "region", "full")
LABELS = {
    "hybrid": "hybrid (nf4 outside, bf16 region, 8-bit AdamW)",
    "region": "region full-parameter (bf16, AdamW)",
    "full": "full tuning (bf16, AdamW)",
}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + double-quantized absmax (8-bit per 64, fp32 per 256)
ADAMW8BIT_BYTES = 2 + 2 * 4 / 256  # two uint8 moments + an fp32 absmax per 256-value block each

# (mode, depth, region layers, seq or None for --seq, vocab or None): the order is the priority under --budget-s.
# Region and hybrid mix (frozen, region) counts so that both per-layer costs are determined; 32 layers with the
# uniform_0.25 region is 24 frozen + 8 region layers.
DEFAULT_CONFIGS = (
    ("hybrid", 2, (1,), None, None),
    ("hybrid", 4, (1,), None, None),
    ("hybrid", 4, (1, 3), None, None),
    ("hybrid", 8, (1, 5), None, None),
    ("hybrid", 2, (1,), 1024, None),  # the sequence probe
    ("region", 2, (1,), None, None),
    ("region", 4, (1,), None, None),
    ("region", 4, (1, 3), None, None),
    ("full", 1, None, None, 32000),  # full tuning's 128k-vocab embeddings + lm_head alone exceed the process cap
    ("full", 2, None, None, 32000),
)
TINY_CONFIGS = (
    ("hybrid", 2, (1,), None, None),
    ("hybrid", 4, (1,), None, None),
    ("hybrid", 4, (1, 3), None, None),
    ("hybrid", 2, (1,), 96, None),
    ("region", 2, (1,), None, None),
    ("region", 4, (1, 3), None, None),
    ("full", 1, None, None, None),
    ("full", 2, None, None, None),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """One measured configuration."""

    mode: str
    depth: int
    region: Optional[tuple]
    seq: int
    vocab: int

    @property
    def n_region(self) -> int:
        return self.depth if self.mode == "full" else len(self.region or ())

    @property
    def n_frozen(self) -> int:
        return self.depth - self.n_region

    def key(self) -> str:
        layers = "all" if self.region is None else ",".join(map(str, self.region))
        return f"{self.mode}-d{self.depth}-r{layers}-s{self.seq}-v{self.vocab}"


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """Command line of the proxy."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="toy widths, in seconds: the test suite's code path")
    parser.add_argument("--seq", type=int, help="tokens per sample (default 512; --tiny 48)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--cap-gib", type=float, default=9.0, help="skip configurations whose floor exceeds this")
    parser.add_argument("--kill-gib", type=float, default=9.5, help="a measurement whose RSS passes this is stopped")
    parser.add_argument("--budget-s", type=float, default=1200.0, help="skip the remaining configurations after")
    parser.add_argument("--workdir", help="where the hybrid's base checkpoints are saved (default: a temp dir)")
    parser.add_argument(
        "--loss-chunk", type=int, help="the loss over the vocabulary in chunks of N positions (vr-plugin --loss_chunk)"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        parser.error(f"--modes {','.join(bad)} not among {', '.join(MODES)}")
    args.seq = args.seq or (48 if args.tiny else 512)
    args.quick = False  # benchlib.setup_process reads it
    return args


def base_shape(args: argparse.Namespace) -> benchlib.Shape:
    """Llama-3-8B widths with a CLIP ViT-L/14-224 tower (256 image tokens, so that a 512-token sample has text);
    ``--tiny``: toy widths whose linear layers still have in-features divisible by 64 (bitsandbytes' CPU path)."""
    if args.tiny:
        return dataclasses.replace(
            benchlib.TINY, name="proxy-tiny", hidden=128, intermediate=448, heads=4, kv_heads=2, seq=args.seq
        )
    return dataclasses.replace(benchlib.LLAMA3_8B, name="llama3-8b-widths", image_size=224, seq=args.seq)


def configs(args: argparse.Namespace) -> list:
    """The configurations to measure, in priority order."""
    shape = base_shape(args)
    table = TINY_CONFIGS if args.tiny else DEFAULT_CONFIGS
    out = []
    for mode, depth, region, seq, vocab in table:
        if mode in args.modes:
            out.append(Config(mode, depth, region, seq or args.seq, vocab or shape.vocab))
    return out


def config_shape(config: Config, args: argparse.Namespace) -> benchlib.Shape:
    """The :class:`benchlib.Shape` of one configuration."""
    return dataclasses.replace(base_shape(args), layers=config.depth, seq=config.seq, vocab=config.vocab)


def step_args(config: Config, args: argparse.Namespace) -> argparse.Namespace:
    """The ``train_step.py`` settings ``train_step.build_mode`` reads."""
    return argparse.Namespace(
        device="cpu",
        dtype="bfloat16",
        region=list(config.region or ()),
        lora_dropout=0.0,
        gradient_checkpointing=True,
        hybrid_optim="adamw8bit",
    )


# --------------------------------------------------------------------------------------------------------------
# Analytic floor


def parameter_counts(shape: benchlib.Shape) -> dict:
    """Parameters per group of the LVLM of ``shape``, counted on the meta device: ``layer`` is per decoder layer."""
    import torch
    import transformers

    from vr_plugin.locate import map_parameters

    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration._from_config(benchlib.lvlm_config(shape))
    counts: dict = {}
    for info in map_parameters(model):
        key = "layer" if info.group == "layer" else info.group
        counts[key] = counts.get(key, 0) + info.param.numel()
    counts["layer"] //= shape.layers
    return counts


def analytic_floor(
    mode: str, n_frozen: int, n_region: int, shape: benchlib.Shape, counts: dict, loss_chunk: Optional[int] = None
) -> dict:
    """Bytes that must be live at the end of the backward: weights, gradients, optimizer state, checkpointed layer
    inputs and the logits (bf16, and the fp32 copy the loss takes; one chunk's with ``loss_chunk``). A floor: no
    attention or MLP intermediates."""
    layer = counts["layer"]
    fixed = sum(v for k, v in counts.items() if k != "layer")
    frozen_bytes = NF4_BYTES if mode == "hybrid" else 2
    weights = fixed * 2 + n_frozen * layer * frozen_bytes + n_region * layer * 2
    trainable = n_region * layer + counts.get("projector", 0)
    if mode == "full":
        trainable += sum(counts.get(k, 0) for k in ("embeddings", "norm", "lm_head"))
    grads = trainable * 2
    state = trainable * (ADAMW8BIT_BYTES if mode == "hybrid" else 4)  # torch AdamW keeps bf16 moments for bf16
    tokens = shape.batch * shape.seq
    logit_rows = min(tokens, loss_chunk) if loss_chunk else tokens
    activations = (n_frozen + n_region) * tokens * shape.hidden * 2 + logit_rows * shape.vocab * (2 + 4)
    parts = dict(weights=weights, grads=grads, optimizer_state=state, activations=activations)
    return {**{k: int(v) for k, v in parts.items()}, "total": int(sum(parts.values()))}


# --------------------------------------------------------------------------------------------------------------
# One measurement (in its own forked process)


class RssGuard:
    """Stops this process (``os._exit(86)``) if its RSS passes ``limit`` bytes: the machine is shared."""

    def __init__(self, limit: int):
        self.limit, self.done = limit, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        from vr_plugin._memory import rss_bytes

        while not self.done.wait(0.05):
            if rss_bytes() > self.limit:
                print(f"[memory_proxy] RSS above {self.limit / 2**30:.1f} GiB: stopped", file=sys.stderr, flush=True)
                os._exit(86)

    def __enter__(self) -> RssGuard:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()


def prime_optimizer(optimizer: Any) -> None:
    """Allocate the optimizer state now (one step on zero gradients), as it exists in every step after the first."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = param.detach().new_zeros(param.shape)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def tensor_bytes(model: Any, optimizer: Any) -> dict:
    """Bytes of the weights (as stored: nf4 packed), of the trainable ones, and of the optimizer state."""
    import torch

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    for module in model.modules():  # nf4 absmax & co. live in the quant state, not in parameters
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        for tensor in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
            weights += tensor.numel() * tensor.element_size() if torch.is_tensor(tensor) else 0
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "weight_bytes": int(weights),
        "trainable": sum(p.numel() for p in trainable),
        "grad_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in states),
        "optimizer": type(optimizer).__name__,
    }


def measure(config: Config, args: argparse.Namespace, model_dir: Optional[str]) -> dict:
    """Build the configuration, allocate its optimizer state, run one training step; bytes above the interpreter."""
    import train_step

    from vr_plugin._memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from vr_plugin.loss import chunked_loss

    benchlib.set_malloc_mmap_threshold()
    shape = config_shape(config, args)
    benchlib.collect()
    base = rss_bytes()
    with RssGuard(base + int(args.kill_gib * 2**30)):
        started = time.perf_counter()
        model, optimizer = train_step.build_mode(config.mode, step_args(config, args), shape, model_dir)
        model.train()
        batch = benchlib.cast_floats(benchlib.make_batch(shape), benchlib.torch_dtype("bfloat16"))
        benchlib.collect()
        loaded = rss_bytes() - base
        prime_optimizer(optimizer)
        benchlib.collect()
        resting = rss_bytes() - base
        reset_peak_rss()
        step_started = time.perf_counter()
        with chunked_loss(model, args.loss_chunk) if args.loss_chunk else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - step_started
        peak = peak_rss_bytes() - base
    return {
        "loaded_bytes": loaded,
        "resting_bytes": resting,
        "peak_bytes": peak,
        "step_s": step_s,
        "total_s": time.perf_counter() - started,
        "loss": float(loss.detach()),
        **tensor_bytes(model, optimizer),
    }


def save_base(shape: benchlib.Shape, directory: str) -> str:
    """The random bf16 LVLM of ``shape`` saved for ``load_for_region`` (the hybrid loads it with nf4)."""
    model = benchlib.build_lvlm(shape, "cpu", "bfloat16")
    model.save_pretrained(directory, max_shard_size="1GB")  # one shard at a time in memory while writing
    return directory


# --------------------------------------------------------------------------------------------------------------
# Fit and report


def fit(rows: list) -> Optional[dict]:
    """Least squares ``peak = c0 + c_frozen * frozen + c_region * region`` (``c_frozen`` dropped where no row has a
    frozen layer); residuals per row; ``None`` with fewer rows than coefficients."""
    import numpy as np

    if not rows:
        return None
    columns = ["c0", "c_frozen", "c_region"]
    matrix = np.array([[1.0, row["n_frozen"], row["n_region"]] for row in rows])
    if not matrix[:, 1].any():
        columns, matrix = ["c0", "c_region"], matrix[:, [0, 2]]
    if len(rows) < len(columns) or np.linalg.matrix_rank(matrix) < len(columns):
        return None
    peaks = np.array([row["peak_bytes"] for row in rows], dtype=float)
    coef, *_ = np.linalg.lstsq(matrix, peaks, rcond=None)
    residuals = peaks - matrix @ coef
    return {
        "coefficients": dict(zip(columns, (float(c) for c in coef))),
        "residuals": {row["key"]: float(r) for row, r in zip(rows, residuals)},
        "dof": len(rows) - len(columns),
    }


def predict(coefficients: dict, n_frozen: int, n_region: int) -> float:
    """The fitted peak at ``n_frozen`` frozen and ``n_region`` region layers."""
    c = coefficients
    return c["c0"] + c.get("c_frozen", 0.0) * n_frozen + c["c_region"] * n_region


def seq_correction(rows: list, shape: benchlib.Shape, target_seq: int) -> Optional[dict]:
    """Peak growth from the proxy's sequence to ``target_seq``: the probe (same configuration, longer sequence)
    measures it at the probe's depth, linear in tokens; the checkpointed inputs of the further layers (one hidden
    state per layer and token, bf16) are added analytically."""
    by_key = {(r["depth"], tuple(r["region"] or ()), r["seq"]): r for r in rows}
    for row in rows:
        if row["seq"] == shape.seq:
            continue
        base = by_key.get((row["depth"], tuple(row["region"] or ()), shape.seq))
        if base is None:
            continue
        per_token = (row["peak_bytes"] - base["peak_bytes"]) / (row["seq"] - shape.seq)
        extra = target_seq - shape.seq
        layers = (TARGET_LAYERS - row["depth"]) * extra * shape.batch * shape.hidden * 2
        return {"probe": row["key"], "per_token_bytes": per_token, "bytes": per_token * extra + layers}
    return None


def summarize(rows: list, args: argparse.Namespace) -> dict:
    """Per mode: fit, 32-layer extrapolation at the proxy's sequence and at 2048, analytic floor, margin to 22 GB."""
    shape = base_shape(args)
    region32 = len(benchlib_region(TARGET_LAYERS))
    fits = {}
    for mode in MODES:
        measured = [r for r in rows if r["mode"] == mode and r.get("ok") and r["seq"] == shape.seq]
        result = fit(measured)
        if result is None:
            continue
        vocab = measured[0]["vocab"]
        n_frozen, n_region = (0, TARGET_LAYERS) if mode == "full" else (TARGET_LAYERS - region32, region32)
        counts = parameter_counts(dataclasses.replace(shape, vocab=vocab))
        long = dataclasses.replace(shape, seq=TARGET_SEQ, vocab=vocab)
        seq_fix = seq_correction([r for r in rows if r["mode"] == mode and r.get("ok")], shape, TARGET_SEQ)
        at_seq = predict(result["coefficients"], n_frozen, n_region)
        entry = {
            **result,
            "vocab": vocab,
            "extrapolated_bytes": at_seq,
            "floor": analytic_floor(
                mode, n_frozen, n_region, dataclasses.replace(shape, vocab=vocab), counts, args.loss_chunk
            ),
            "floor_2048": analytic_floor(mode, n_frozen, n_region, long, counts, args.loss_chunk),
            "seq_correction": seq_fix,
        }
        if seq_fix is not None:
            entry["extrapolated_2048_bytes"] = at_seq + seq_fix["bytes"]
        fits[mode] = entry
    hybrid = fits.get("hybrid", {})
    final = hybrid.get("extrapolated_2048_bytes", hybrid.get("extrapolated_bytes"))
    answer = None
    if final is not None:
        answer = {"peak_gb": final / GB, "margin_gb": TARGET_GB - final / GB, "fits": final / GB <= TARGET_GB}
    return {"fits": fits, "hybrid_answer": answer}


def benchlib_region(layers: int) -> list:
    """The ``uniform_0.25`` region at ``layers`` layers (1,5,9,13,19,23,27,31 at 32)."""
    from vr_plugin import select_layers

    return select_layers("uniform_0.25", layers)


def _gb(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / GB


def run_rows(rows: list, fits: dict) -> list:
    """Table rows of the measurements, with each one's fitted value and residual."""
    out = []
    for row in rows:
        entry = dict(row, region_text="all" if row["region"] is None else ",".join(map(str, row["region"])))
        if row.get("ok"):
            entry.update(
                resting_gb=_gb(row["resting_bytes"]),
                peak_gb=_gb(row["peak_bytes"]),
                floor_gb=_gb(row["floor"]["total"]),
                over_floor_gb=_gb(row["peak_bytes"] - row["floor"]["total"]),
                state_gb=_gb(row["optimizer_state_bytes"]),
            )
            residual = fits.get(row["mode"], {}).get("residuals", {}).get(row["key"])
            entry["residual_mb"] = None if residual is None else residual / 1e6
        out.append(entry)
    return out


RUN_COLUMNS = [
    ("label", "mode"),
    ("depth", "layers"),
    ("region_text", "region layers"),
    ("seq", "seq"),
    ("vocab", "vocab"),
    ("resting_gb", "at rest GB"),
    ("peak_gb", "step peak GB"),
    ("floor_gb", "analytic floor GB"),
    ("over_floor_gb", "peak − floor GB"),
    ("state_gb", "opt state GB"),
    ("residual_mb", "fit residual MB"),
    ("step_s", "step s"),
    ("status", "status"),
]
FIT_COLUMNS = [
    ("label", "mode"),
    ("vocab", "vocab"),
    ("c0_gb", "c0 GB"),
    ("frozen_gb", "per frozen layer GB"),
    ("region_gb", "per region layer GB"),
    ("dof", "residual dof"),
    ("max_residual_mb", "max abs residual MB"),
    ("at_seq_gb", "32 layers, proxy seq, GB"),
    ("floor_gb", "floor, proxy seq, GB"),
    ("seq_fix_gb", "seq → 2048 GB"),
    ("at_2048_gb", "32 layers, seq 2048, GB"),
    ("floor_2048_gb", "floor, seq 2048, GB"),
]


def fit_rows(fits: dict) -> list:
    """One table row per fitted mode."""
    out = []
    for mode, entry in fits.items():
        c = entry["coefficients"]
        fix = entry.get("seq_correction")
        out.append(
            {
                "label": LABELS[mode],
                "vocab": entry["vocab"],
                "c0_gb": _gb(c["c0"]),
                "frozen_gb": _gb(c.get("c_frozen")),
                "region_gb": _gb(c["c_region"]),
                "dof": entry["dof"],
                "max_residual_mb": max((abs(r) for r in entry["residuals"].values()), default=0.0) / 1e6,
                "at_seq_gb": _gb(entry["extrapolated_bytes"]),
                "floor_gb": _gb(entry["floor"]["total"]),
                "seq_fix_gb": _gb(fix["bytes"]) if fix else None,
                "at_2048_gb": _gb(entry.get("extrapolated_2048_bytes")),
                "floor_2048_gb": _gb(entry["floor_2048"]["total"]),
            }
        )
    return out


def render(rows: list, summary: dict, args: argparse.Namespace) -> str:
    """The markdown report: measurements, fits, and the answer for the hybrid."""
    shape = base_shape(args)
    lines = [
        f"Shape: {shape.describe()}; bf16, gradient checkpointing on, batch {shape.batch}; loss "
        f"{f'in chunks of {args.loss_chunk} positions' if args.loss_chunk else 'over the whole logits'}; each "
        "configuration in its "
        "own forked process; peak = peak RSS of one training step above the bare interpreter (optimizer state "
        "allocated before it); GB = 10^9 bytes.",
        "",
        benchlib.markdown_table(run_rows(rows, summary["fits"]), RUN_COLUMNS),
        "",
        "Fit per mode: peak = c0 + per frozen layer × frozen + per region layer × region, least squares over the "
        f"rows at seq {shape.seq}; extrapolated to {TARGET_LAYERS} layers with the uniform_0.25 region (24 frozen "
        "+ 8 region layers; full: 32 trained).",
        "",
        benchlib.markdown_table(fit_rows(summary["fits"]), FIT_COLUMNS),
    ]
    answer = summary.get("hybrid_answer")
    if answer:
        verdict = "fits" if answer["fits"] else "does NOT fit"
        lines += [
            "",
            f"**Hybrid at {TARGET_LAYERS} layers: {answer['peak_gb']:.2f} GB extrapolated, {verdict} the "
            f"{TARGET_GB:g} GB target (margin {answer['margin_gb']:+.2f} GB).**",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Driver


def mem_available() -> int:
    """``MemAvailable`` of the machine, bytes."""
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def row_for(config: Config, args: argparse.Namespace, counts: dict) -> dict:
    """The row of one configuration, before measuring: its shape and analytic floor."""
    shape = config_shape(config, args)
    return {
        "key": config.key(),
        "mode": config.mode,
        "label": LABELS[config.mode],
        "depth": config.depth,
        "region": list(config.region) if config.region is not None else None,
        "n_frozen": config.n_frozen,
        "n_region": config.n_region,
        "seq": config.seq,
        "vocab": config.vocab,
        "floor": analytic_floor(config.mode, config.n_frozen, config.n_region, shape, counts, args.loss_chunk),
        "ok": False,
    }


def why_skip(row: dict, args: argparse.Namespace, started: float) -> Optional[str]:
    """Why a configuration is not run: time budget, process cap, free memory; ``None`` to run it."""
    floor = row["floor"]["total"]
    if time.perf_counter() - started > args.budget_s:
        return f"skipped: the {args.budget_s:g} s budget is spent"
    if floor > args.cap_gib * 2**30:
        return f"skipped: analytic floor {floor / 2**30:.1f} GiB above the {args.cap_gib:g} GiB process cap"
    if mem_available() < floor + 2 * 2**30:
        return f"skipped: MemAvailable {mem_available() / 2**30:.1f} GiB, floor {floor / 2**30:.1f} GiB"
    return None


def measure_all(args: argparse.Namespace, workdir: str, started: float) -> list:
    """Every configuration in its own forked process (bases for the hybrid saved once per depth and vocab)."""
    rows, bases = [], {}
    count_cache: dict = {}
    for config in configs(args):
        shape = config_shape(config, args)
        counts = count_cache.setdefault((config.depth, config.vocab), parameter_counts(shape))
        row = row_for(config, args, counts)
        rows.append(row)
        row["status"] = why_skip(row, args, started)
        if row["status"]:
            continue
        model_dir = None
        if config.mode == "hybrid":
            model_dir = bases.get((config.depth, config.vocab))
            if model_dir is None:
                model_dir = os.path.join(workdir, f"base-{config.depth}-{config.vocab}")
                saved = benchlib.run_isolated(True, save_base, dataclasses.replace(shape, seq=args.seq), model_dir)
                if not saved["ok"]:
                    row["status"] = f"base not saved: {saved['error']}"
                    continue
                bases[(config.depth, config.vocab)] = model_dir
        print(f"[memory_proxy] {config.key()} (load {benchlib.loadavg()}) ...", file=sys.stderr, flush=True)
        outcome = benchlib.run_isolated(True, measure, config, args, model_dir)
        if outcome["ok"]:
            row.update(outcome["result"], ok=True, status="ok")
        else:
            row["status"] = outcome["error"]
            print(outcome.get("traceback", outcome["error"]), file=sys.stderr)
        if args.out:  # a partial record after every configuration: a long run that is stopped still leaves data
            with open(args.out + ".partial", "w", encoding="utf-8") as handle:
                json.dump(rows, handle, indent=1, default=str)
    return rows


def main(argv: Optional[list] = None) -> dict:
    """Measure, fit, print markdown and write JSON."""
    args = parse_args(argv)
    benchlib.setup_process(args)
    info = benchlib.machine("cpu")
    info["mem_available_gib_start"] = round(mem_available() / 2**30, 1)
    benchlib.preload(
        "numpy", "transformers.models.llava.modeling_llava", "bitsandbytes", "accelerate", "safetensors.torch"
    )
    benchlib.preload("vr_plugin.freeze", "vr_plugin.quant", "vr_plugin.loss", "train_step")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vr_proxy_", dir=args.workdir) as workdir:
        rows = measure_all(args, workdir, started)
    summary = summarize(rows, args)
    report = {
        "benchmark": "memory_proxy",
        "machine": info,
        "shape": vars(base_shape(args)),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        **summary,
        "runtime_s": time.perf_counter() - started,
    }
    benchlib.finish(report, render(rows, summary, args), args.out)
    return report


if __name__ == "__main__":
    main()
