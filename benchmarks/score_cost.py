"""Cost of ``score_layers``: time and peak memory against a plain forward pass over the same batches, at two depths.

Time: ``score_layers(model, batches, metric)`` against ``model(**batch, use_cache=False)`` under ``torch.no_grad()``
over the same batches, alternated, median of repeats. Memory: peak above the loaded model (after a warm-up
forward) for scoring, for the plain forward, and for a forward that keeps every hidden state (the control, which
does grow with depth), at depth L and 2L, each measurement in its own forked process (peak RSS on CPU,
``max_memory_allocated`` on GPU). Prints markdown tables and writes JSON (``--out``).

    python benchmarks/score_cost.py                                    # CPU default
    python benchmarks/score_cost.py --device cuda --preset vicuna-7b   # real size, GPU
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import benchlib

WHAT = ("score", "forward", "hidden_states")


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    benchlib.add_shape_arguments(parser)
    parser.add_argument("--metric", default="bi", help="score_layers metric (bi, bi_multimodal, angular, ...)")
    parser.add_argument("--batches", type=int, help="calibration batches per pass (default 4; --quick 2)")
    parser.add_argument("--repeats", type=int, help="timed passes of each kind, median (default 5; --quick 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights (default: float32 cpu, bf16 cuda)")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each memory measurement in its own forked process (default: on; off with --quick)",
    )
    args = parser.parse_args(argv)
    args.batches = args.batches or (2 if args.quick else 4)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.isolate is None:
        args.isolate = not args.quick
    return args


def _setup(shape: benchlib.Shape, args: argparse.Namespace) -> tuple:
    model = benchlib.build_lvlm(shape, args.device, args.dtype).eval()
    batches = [benchlib.make_batch(shape, seed=i, labels=False, device=args.device) for i in range(args.batches)]
    if args.dtype != "float32":
        batches = [benchlib.cast_floats(b, benchlib.torch_dtype(args.dtype)) for b in batches]
    return model, batches


def _forward(model: Any, batches: list, keep_hidden: bool = False) -> None:
    import torch

    with torch.no_grad():
        for batch in batches:
            out = model(**batch, use_cache=False, output_hidden_states=keep_hidden)
            del out


def _score(model: Any, batches: list, metric: str) -> dict:
    from vr_plugin import score_layers

    return score_layers(model, batches, metric, progress=False)


def timing(shape: benchlib.Shape, args: argparse.Namespace) -> dict:
    """Alternating plain-forward and scoring passes over the same batches; seconds per pass."""
    model, batches = _setup(shape, args)
    _forward(model, batches)  # warm-up
    _score(model, batches, args.metric)
    times: dict = {"forward": [], "score": [], "forward_cpu": [], "score_cpu": []}
    for _ in range(args.repeats):
        for what in ("forward", "score"):
            benchlib.sync(args.device)
            start, cpu_start = benchlib.now(), benchlib.cpu_now()
            _forward(model, batches) if what == "forward" else _score(model, batches, args.metric)
            benchlib.sync(args.device)
            times[what].append(benchlib.now() - start)
            times[what + "_cpu"].append(benchlib.cpu_now() - cpu_start)
    return {"times": times, "loadavg": benchlib.loadavg()}


def peak_memory(shape: benchlib.Shape, args: argparse.Namespace, what: str) -> dict:
    """Peak bytes above the loaded model (after a warm-up forward) for one pass of ``what``."""
    if args.device == "cpu" and args.isolate:
        benchlib.set_malloc_mmap_threshold()  # freed tensors go back to the OS: the peak RSS tracks live memory
    model, batches = _setup(shape, args)
    memory = benchlib.Memory(args.device)
    _forward(model, batches[:1])
    benchlib.collect()
    base = memory.current()
    memory.reset_peak()
    if what == "score":
        _score(model, batches, args.metric)
    else:
        _forward(model, batches, keep_hidden=what == "hidden_states")
    benchlib.sync(args.device)
    return {"peak_bytes": memory.peak() - base, "model_bytes": base}


def main(argv: Optional[list] = None) -> dict:
    import dataclasses

    args = parse_args(argv)
    shape = benchlib.resolve_shape(args)
    benchlib.setup_process(args)
    info = benchlib.machine(args.device)
    benchlib.preload("transformers.models.llava.modeling_llava", "vr_plugin.score")
    depths = (shape.layers, 2 * shape.layers)
    memory: dict = {}
    errors = []
    for depth in depths:
        deep = dataclasses.replace(shape, layers=depth)
        for what in WHAT:
            print(f"[score_cost] memory: {what} at {depth} layers ...", file=sys.stderr, flush=True)
            outcome = benchlib.run_isolated(args.isolate, peak_memory, deep, args, what)
            if outcome["ok"]:
                memory[(depth, what)] = outcome["result"]["peak_bytes"]
            else:
                errors.append(f"{what} at {depth} layers: {outcome['error']}")
                print(outcome.get("traceback", outcome["error"]), file=sys.stderr)
    print("[score_cost] timing ...", file=sys.stderr, flush=True)
    timed = benchlib.run_isolated(args.isolate, timing, shape, args)
    if not timed["ok"]:
        raise SystemExit(f"timing failed: {timed['error']}\n{timed.get('traceback', '')}")
    times = timed["result"]["times"]

    itemsize = 4 if args.dtype == "float32" else 2
    hidden_mib = shape.batch * shape.seq * shape.hidden * itemsize / benchlib.MIB  # one hidden state
    forward_s, score_s = benchlib.median(times["forward"]), benchlib.median(times["score"])
    forward_cpu, score_cpu = benchlib.median(times["forward_cpu"]), benchlib.median(times["score_cpu"])
    time_rows = [
        {"what": "plain forward (no_grad)", "seconds": forward_s, "ratio": 1.0, "cpu_s": forward_cpu, "cpu_ratio": 1.0},
        {
            "what": f"score_layers ({args.metric})",
            "seconds": score_s,
            "ratio": benchlib.ratio(score_s, forward_s),
            "cpu_s": score_cpu,
            "cpu_ratio": benchlib.ratio(score_cpu, forward_cpu),
        },
    ]
    time_columns = [("what", "pass"), ("seconds", "seconds"), ("ratio", "/ forward")]
    if args.device == "cpu":
        time_columns += [("cpu_s", "CPU seconds"), ("cpu_ratio", "CPU / forward")]
    memory_rows = []
    for what, label in zip(WHAT, ("score_layers", "plain forward", "forward keeping all hidden states (control)")):
        row: dict = {"what": label}
        for depth in depths:
            value = memory.get((depth, what))
            row[f"mib_{depth}"] = value / benchlib.MIB if value is not None else None
        low, high = row[f"mib_{depths[0]}"], row[f"mib_{depths[1]}"]
        row["growth_mib"] = high - low if low is not None and high is not None else None
        row["growth_hidden_states"] = row["growth_mib"] / hidden_mib if row["growth_mib"] is not None else None
        memory_rows.append(row)
    score_row = memory_rows[0]
    targets = [
        benchlib.target("score_layers time / plain forward", benchlib.ratio(score_s, forward_s), 1.15),
        benchlib.target(
            f"score_layers peak growth from {depths[0]} to {depths[1]} layers, in hidden states "
            f"({hidden_mib:.2g} MiB each)",
            score_row["growth_hidden_states"],
            1.0,
        ),
    ]
    memory_kind = "max_memory_allocated" if args.device == "cuda" else "peak RSS"
    text = "\n".join(
        [
            f"Shape: {shape.describe()}; dtype {args.dtype}; {args.batches} batches of {shape.batch} x {shape.seq} "
            f"tokens per pass; time: median of {args.repeats} alternating passes at {shape.layers} layers.",
            "",
            benchlib.markdown_table(time_rows, time_columns),
            "",
            f"Peak memory above the loaded model ({memory_kind}, MiB"
            f"{', each in its own process' if args.isolate else ', all in one process'}); one hidden state = "
            f"{hidden_mib:.3g} MiB:",
            "",
            benchlib.markdown_table(
                memory_rows,
                [
                    ("what", "pass"),
                    (f"mib_{depths[0]}", f"{depths[0]} layers"),
                    (f"mib_{depths[1]}", f"{depths[1]} layers"),
                    ("growth_mib", "growth MiB"),
                    ("growth_hidden_states", "growth / hidden state"),
                ],
            ),
            *(["", "Not measured: " + "; ".join(errors)] if errors else []),
            "",
            "Targets:",
            "",
            benchlib.target_rows(targets),
        ]
    )
    report = {
        "benchmark": "score_cost",
        "machine": info,
        "shape": vars(shape) | {"image_tokens": shape.image_tokens},
        "settings": {k: getattr(args, k) for k in ("device", "dtype", "metric", "batches", "repeats", "isolate")},
        "time_rows": time_rows,
        "times_s": times,
        "memory_rows": memory_rows,
        "hidden_state_mib": hidden_mib,
        "targets": targets,
    }
    benchlib.finish(report, text, args.out)
    return report


if __name__ == "__main__":
    main()
