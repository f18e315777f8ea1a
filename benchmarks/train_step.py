"""Training cost of the visual region against full tuning and all-layer LoRA: one LVLM, one batch, six modes.

Per mode: median step time (forward + backward + optimizer step, after warm-up), peak memory (each mode in its
own forked process; ``max_memory_allocated`` on GPU, peak RSS above the bare interpreter on CPU), trainable
parameters and optimizer-state bytes read from the real optimizer after its steps, and the ratios to full tuning
and to all-layer LoRA. Prints markdown tables and writes JSON (``--out``).

    python benchmarks/train_step.py                                    # CPU default, a few minutes
    python benchmarks/train_step.py --device cuda --preset llama3-8b   # real size, GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Optional

import benchlib

MODES = ("full", "region", "lora_all", "lora_region", "qlora_region", "hybrid")
QUANTIZED = ("qlora_region", "hybrid")


def mode_label(mode: str, spec: str, shape: benchlib.Shape) -> str:
    return {
        "full": "full tuning",
        "region": f"region full-parameter ({spec})",
        "lora_all": f"LoRA all layers (r={shape.lora_r})",
        "lora_region": f"LoRA in the region (r={shape.lora_r})",
        "qlora_region": f"QLoRA in the region (nf4, r={shape.lora_r})",
        "hybrid": "hybrid (nf4 outside, full inside)",
    }[mode]


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    benchlib.add_shape_arguments(parser)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--region", default="uniform_0.25", help="the visual region spec")
    parser.add_argument("--steps", type=int, help="timed steps per mode (default 5; --quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; --quick 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="timing passes (each in fresh processes); medians pool the steps of every pass",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights (default: float32 cpu, bf16 cuda)")
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="non-reentrant activation checkpointing in every mode (default: off on cpu, on on cuda)",
    )
    parser.add_argument(
        "--hybrid-optim",
        choices=("adamw8bit", "adamw"),
        default="adamw8bit",
        help="optimizer of the hybrid mode (bitsandbytes 8-bit AdamW, as the 24 GB recipe; or torch AdamW)",
    )
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (the paper's 0.05)")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each mode in its own forked process (default: on; off with --quick)",
    )
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time every mode in one process, steps round-robin, and measure peak memory separately, each mode "
        "in its own process (default: on on cpu; off on cuda, where each mode runs alone and is timed under the "
        "peak meter)",
    )
    parser.add_argument("--workdir", help="where the quantized modes' base checkpoint is saved (default: a temp dir)")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    cuda = args.device == "cuda"
    args.steps = args.steps or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = cuda
    if args.isolate is None:
        args.isolate = not args.quick
    if args.interleave is None:
        args.interleave = not cuda
    return args


# --------------------------------------------------------------------------------------------------------------
# One mode


def _enable_checkpointing(model: Any) -> None:
    from vr_plugin.locate import unwrap_model

    core = unwrap_model(model)
    enable = getattr(core, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        core.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _load_kwargs(device: str) -> dict:
    return {"device_map": {"": 0}} if device == "cuda" else {}


def build_mode(mode: str, args: argparse.Namespace, shape: benchlib.Shape, model_dir: Optional[str]) -> tuple:
    """``(model, optimizer)`` for one mode, vision tower frozen everywhere (LLaVA stage 2)."""
    import torch

    from vr_plugin import apply_region_lora, apply_visual_region, load_for_region, load_quantized, prepare_qlora

    dtype = benchlib.torch_dtype(args.dtype)
    lora = dict(r=shape.lora_r, lora_alpha=shape.lora_alpha, lora_dropout=args.lora_dropout)
    region_options = {"tune_vision_tower": False}
    if mode in QUANTIZED:
        if model_dir is None:
            raise RuntimeError("the quantized modes need the saved base checkpoint")
        if mode == "qlora_region":
            model = load_quantized(model_dir, "nf4", dtype=dtype, **_load_kwargs(args.device))
            benchlib.freeze_vision_tower(model)
            model, _ = prepare_qlora(model, args.region, gradient_checkpointing=False, **lora)
        else:
            model, plan = load_for_region(
                model_dir, args.region, "nf4", dtype=dtype, region_options=region_options, **_load_kwargs(args.device)
            )
    else:
        model = benchlib.build_lvlm(shape, args.device, args.dtype)
        benchlib.freeze_vision_tower(model)
        if mode == "region":
            apply_visual_region(model, args.region, **region_options)
        elif mode == "lora_all":
            model, _ = apply_region_lora(model, "all", **lora)
        elif mode == "lora_region":
            model, _ = apply_region_lora(model, args.region, **lora)
    if mode in ("lora_all", "lora_region") and dtype != torch.float32:
        # peft keeps adapters in fp32 over a bf16 base (autocast_adapter_dtype); a bf16 run, as DeepSpeed bf16
        # trains them in the paper's recipe, keeps them in the model's dtype
        for param in model.parameters():
            if param.requires_grad and param.dtype != dtype:
                param.data = param.data.to(dtype)
    if args.gradient_checkpointing:
        _enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == "hybrid" and args.hybrid_optim == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    return model, optimizer


PHASES = ("forward", "backward", "optimizer", "step", "step_cpu")


class ModeRun:
    """One mode, built and ready to step: model, optimizer, batch."""

    def __init__(self, mode: str, args: argparse.Namespace, shape: benchlib.Shape, model_dir: Optional[str]):
        self.mode, self.args = mode, args
        self.model, self.optimizer = build_mode(mode, args, shape, model_dir)
        batch = benchlib.make_batch(shape, device=args.device)
        if args.dtype != "float32":
            batch = benchlib.cast_floats(batch, benchlib.torch_dtype(args.dtype))
        self.batch = batch
        self.model.train()
        self.samples: dict = {key: [] for key in PHASES}
        self.loss = float("nan")

    def step(self, record: bool = True) -> None:
        """Forward + backward + optimizer step; phase times (wall) and the step's process CPU time."""
        device = self.args.device
        benchlib.sync(device)
        c0, t0 = benchlib.cpu_now(), benchlib.now()
        loss = self.model(**self.batch).loss
        benchlib.sync(device)
        t1 = benchlib.now()
        loss.backward()
        benchlib.sync(device)
        t2 = benchlib.now()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        benchlib.sync(device)
        t3, c3 = benchlib.now(), benchlib.cpu_now()
        if record:
            for key, value in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t3 - t0, c3 - c0)):
                self.samples[key].append(value)
        self.loss = float(loss.detach())

    def summary(self) -> dict:
        """Trainable parameters and optimizer-state bytes, read from the optimizer after its steps."""
        import torch

        optimizer = self.optimizer
        return {
            "mode": self.mode,
            "trainable": sum(p.numel() for group in optimizer.param_groups for p in group["params"]),
            "total_params": sum(_logical_numel(p) for p in self.model.parameters()),
            "optimizer_state_bytes": sum(
                t.numel() * t.element_size()
                for state in optimizer.state.values()
                for t in state.values()
                if torch.is_tensor(t)
            ),
            "optimizer": type(optimizer).__name__,
            "loss": self.loss,
        }


def time_modes(modes: list, args: argparse.Namespace, shape: benchlib.Shape, model_dir: Optional[str]) -> dict:
    """Build every mode in this process, warm each up, then time their steps round-robin (step 1 of every mode,
    step 2 of every mode, ...), so that load from other processes falls on all modes alike. ``{mode: result}``."""
    runs, results = {}, {}
    for mode in modes:
        built = benchlib.run_isolated(False, ModeRun, mode, args, shape, model_dir)
        if built["ok"]:
            runs[mode] = built["result"]
        else:
            results[mode] = {"error": built["error"], "traceback": built.get("traceback", "")}
    for _ in range(args.warmup):
        for run in runs.values():
            run.step(record=False)
    for _ in range(args.steps):
        for run in runs.values():
            run.step()
    for mode, run in runs.items():
        results[mode] = {**run.summary(), "samples_s": run.samples, "loadavg": benchlib.loadavg()}
    return results


def run_mode(
    mode: str, args: argparse.Namespace, shape: benchlib.Shape, model_dir: Optional[str], what: str = "both"
) -> dict:
    """One mode alone: ``memory`` (one warm-up step, then one step under the peak meter) or ``both`` (warm-up,
    timed steps under the peak meter). Bytes and seconds.

    On CPU the memory run returns every freed tensor to the OS at once (so the peak RSS tracks live memory), which
    makes each allocation a fresh mapping whose page faults would slow a timed step: timing runs elsewhere.
    """
    if what == "memory" and args.device == "cpu":
        benchlib.set_malloc_mmap_threshold()
    memory = benchlib.Memory(args.device)
    benchlib.collect()
    base = memory.current()  # the interpreter and libraries (cpu) / nothing allocated (cuda)
    run = ModeRun(mode, args, shape, model_dir)
    benchlib.collect()
    loaded = memory.current() - base
    warmup, steps = (1, 1) if what == "memory" else (args.warmup, args.steps)
    for _ in range(warmup):
        run.step(record=False)
    benchlib.collect()
    setup_peak = memory.peak() - base  # building / loading and the warm-up steps
    memory.reset_peak()
    resting = memory.current() - base  # weights + optimizer state, between steps
    for _ in range(steps):
        run.step(record=what != "memory")
    result = {
        **run.summary(),
        "peak_bytes": memory.peak() - base,
        "setup_peak_bytes": setup_peak,
        "model_bytes": loaded,
        "resting_bytes": resting,
        "reserved_bytes": memory.peak_reserved(),
        "loadavg": benchlib.loadavg(),
    }
    if what != "memory":
        result["samples_s"] = run.samples
    return result


def _logical_numel(param: Any) -> int:
    from vr_plugin.locate import numel

    return numel(param)


def save_base(shape: benchlib.Shape, args: argparse.Namespace, directory: str) -> str:
    """The same randomly initialised LVLM, saved for the modes that load it quantized."""
    model = benchlib.build_lvlm(shape, args.device, args.dtype)
    model.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------------------------
# Report


def summarize(rows: list, args: argparse.Namespace) -> tuple:
    """Ratios and targets; returns ``(rows, targets)``."""
    by_mode = {row["mode"]: row for row in rows if row.get("ok")}
    full = by_mode.get("full")
    lora_all = by_mode.get("lora_all")
    for row in rows:
        if not row.get("ok"):
            continue
        row["peak_mib"] = row["peak_bytes"] / benchlib.MIB
        row["reserved_mib"] = row["reserved_bytes"] / benchlib.MIB if row.get("reserved_bytes") else None
        row["optimizer_state_mib"] = row["optimizer_state_bytes"] / benchlib.MIB
        for ref_name, ref in (("full", full), ("lora_all", lora_all)):
            if ref is None:
                continue
            row[f"time_vs_{ref_name}"] = benchlib.ratio(row.get("step_s"), ref.get("step_s"))
            row[f"cpu_vs_{ref_name}"] = benchlib.ratio(row.get("step_cpu_s"), ref.get("step_cpu_s"))
            row[f"memory_vs_{ref_name}"] = benchlib.ratio(row["peak_bytes"], ref["peak_bytes"])
        if full:
            row["trainable_vs_full"] = benchlib.ratio(row["trainable"], full["trainable"])
            row["state_vs_full"] = benchlib.ratio(row["optimizer_state_bytes"], full["optimizer_state_bytes"])
    targets = []
    region = by_mode.get("region")
    if full and region:
        targets.append(benchlib.target("region full-parameter step time / full tuning", region["time_vs_full"], 0.80))
        share = region["trainable_vs_full"]
        targets.append(
            {
                "target": "region optimizer state / full ≈ region's share of trainable parameters",
                "measured": region["state_vs_full"],
                "limit": f"≈ {share:.3f}",
                "met": abs(region["state_vs_full"] - share) <= 0.02 if region["state_vs_full"] is not None else None,
            }
        )
    if lora_all and "lora_region" in by_mode:
        targets.append(
            benchlib.target("LoRA region step time / all-layer LoRA", by_mode["lora_region"]["time_vs_lora_all"], 0.85)
        )
    if args.device == "cuda" and "hybrid" in by_mode:  # GB = 1e9 bytes, as cards are sold
        hybrid_gb = by_mode["hybrid"]["peak_bytes"] / 1e9
        targets.append(benchlib.target("hybrid peak memory, GB (fits one 24 GB card)", hybrid_gb, 22))
    if args.device == "cuda" and region:
        region_gb = region["peak_bytes"] / 1e9
        targets.append(benchlib.target("region full-parameter peak memory, GB (fits one 80 GB card)", region_gb, 80))
    return rows, targets


COLUMNS = [
    ("label", "mode"),
    ("step_s", "step s"),
    ("time_vs_full", "time / full"),
    ("time_vs_lora_all", "time / LoRA-all"),
    ("step_cpu_s", "step CPU s"),
    ("cpu_vs_full", "CPU / full"),
    ("cpu_vs_lora_all", "CPU / LoRA-all"),
    ("forward_s", "fwd s"),
    ("backward_s", "bwd s"),
    ("optimizer_s", "opt s"),
    ("peak_mib", "peak MiB"),
    ("reserved_mib", "reserved MiB"),
    ("memory_vs_full", "mem / full"),
    ("memory_vs_lora_all", "mem / LoRA-all"),
    ("trainable", "trainable params"),
    ("trainable_vs_full", "trainable / full"),
    ("optimizer_state_mib", "opt state MiB"),
    ("state_vs_full", "state / full"),
]


def render(rows: list, targets: list, args: argparse.Namespace, shape: benchlib.Shape) -> str:
    if args.device == "cpu":
        columns = [c for c in COLUMNS if c[0] != "reserved_mib"]
    else:
        columns = [c for c in COLUMNS if "cpu" not in c[0]]
    memory = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS above the bare interpreter"
    rounds = f" x {args.rounds} rounds" if args.rounds > 1 else ""
    timing = ", the modes' steps interleaved round-robin in one process" if args.interleave else ""
    where = ", each mode in its own process" if args.isolate else ", all modes in one process"
    lines = [
        f"Shape: {shape.describe()}; dtype {args.dtype}; gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; region {args.region}; AdamW (hybrid: "
        f"{args.hybrid_optim}); {args.warmup} warm-up + {args.steps} timed steps{rounds}{timing}, median; "
        f"peak memory = {memory}{where}.",
        "",
        benchlib.markdown_table([r for r in rows if r.get("ok")], columns),
    ]
    failed = [r for r in rows if not r.get("ok")]
    if failed:
        lines += ["", "Not measured: " + "; ".join(f"{r['label']}: {r['error']}" for r in failed)]
    if targets:
        lines += ["", "Targets:", "", benchlib.target_rows(targets)]
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> dict:  # noqa: C901 (argument dispatch of every preset)
    args = parse_args(argv)
    shape = benchlib.resolve_shape(args)
    benchlib.setup_process(args)
    if any(m in QUANTIZED for m in args.modes):
        try:
            import bitsandbytes  # noqa: F401
        except Exception as error:  # pragma: no cover - depends on the install
            print(f"bitsandbytes unavailable ({error}); skipping {', '.join(QUANTIZED)}", file=sys.stderr)
            args.modes = [m for m in args.modes if m not in QUANTIZED]
    info = benchlib.machine(args.device)
    # every mode's child starts with the same libraries loaded, whichever modes run
    benchlib.preload(
        "transformers.models.llava.modeling_llava",
        "peft",
        "bitsandbytes",
        "accelerate",
        "safetensors.torch",
        "vr_plugin.freeze",
        "vr_plugin.lora",
        "vr_plugin.quant",
    )
    with tempfile.TemporaryDirectory(prefix="vr_bench_", dir=args.workdir) as tmp:
        model_dir = None
        if any(m in QUANTIZED for m in args.modes):
            model_dir = os.path.join(tmp, "base")
            saved = benchlib.run_isolated(args.isolate, save_base, shape, args, model_dir)
            if not saved["ok"]:
                raise SystemExit(f"could not save the base model: {saved['error']}\n{saved.get('traceback', '')}")
        rows = {
            m: {"mode": m, "label": mode_label(m, args.region, shape), "ok": True, "samples_s": {}} for m in args.modes
        }

        def merge(mode: str, outcome: dict) -> None:
            row = rows[mode]
            if not outcome["ok"] or "error" in outcome.get("result", {}):
                error = outcome.get("error") or outcome["result"]["error"]
                row.update(ok=False, error=error)
                print(outcome.get("traceback") or outcome.get("result", {}).get("traceback") or error, file=sys.stderr)
                return
            result = dict(outcome["result"])
            for key, values in result.pop("samples_s", {}).items():
                row["samples_s"].setdefault(key, []).extend(values)
            row.update(result)

        for round_index in range(args.rounds):
            if args.interleave:  # every mode in one process, steps round-robin
                print(f"[train_step] timing, round {round_index + 1} ...", file=sys.stderr, flush=True)
                outcome = benchlib.run_isolated(args.isolate, time_modes, args.modes, args, shape, model_dir)
                for mode in args.modes:
                    if outcome["ok"]:
                        merge(mode, {"ok": True, "result": outcome["result"][mode]})
                    else:
                        merge(mode, outcome)
            else:  # each mode alone (GPU: one model at a time), timed under the peak meter
                for mode in args.modes:
                    if rows[mode]["ok"]:
                        print(f"[train_step] {mode}, round {round_index + 1} ...", file=sys.stderr, flush=True)
                        merge(mode, benchlib.run_isolated(args.isolate, run_mode, mode, args, shape, model_dir))
        if args.interleave:  # peak memory: each mode alone, in its own process
            for mode in args.modes:
                if rows[mode]["ok"]:
                    print(f"[train_step] {mode}: peak memory ...", file=sys.stderr, flush=True)
                    merge(mode, benchlib.run_isolated(args.isolate, run_mode, mode, args, shape, model_dir, "memory"))
        rows = list(rows.values())
        for row in rows:
            samples = row["samples_s"]
            if row["ok"] and samples:
                row.update({f"{key}_s": benchlib.median(values) for key, values in samples.items()})
    rows, targets = summarize(rows, args)
    report = {
        "benchmark": "train_step",
        "machine": info,
        "shape": vars(shape) | {"image_tokens": shape.image_tokens},
        "settings": {
            k: getattr(args, k)
            for k in (
                "device",
                "dtype",
                "region",
                "steps",
                "warmup",
                "rounds",
                "gradient_checkpointing",
                "hybrid_optim",
                "lora_dropout",
                "isolate",
                "interleave",
            )
        },
        "rows": rows,
        "targets": targets,
    }
    benchlib.finish(report, render(rows, targets, args, shape), args.out)
    return report


if __name__ == "__main__":
    main()
