"""Inference speed of pruned models: prefill latency and decode tokens/s with k layers removed outside the region.

One LVLM; copies of it pruned by ``prune_outside_region`` (k = 1, 2, 4, 8 layers, chosen outside the visual region
by angular-distance scores from ``score_layers``, as in the paper). Prefill: one forward over a fixed image+text
prompt (``use_cache=True``, logits of the last position only). Decode: greedy ``generate`` with the KV cache,
``min_new_tokens = max_new_tokens``, timed per new token by a logits processor that notes the clock (median over
all steps of all repeats). Speedups are compared with the ideal L / (L - k). Prints markdown tables and writes JSON
(``--out``).

    python benchmarks/prune_latency.py                                    # CPU default
    python benchmarks/prune_latency.py --device cuda --preset vicuna-7b   # real size, GPU
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any, Optional

import benchlib


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    benchlib.add_shape_arguments(parser)
    parser.add_argument("--remove", help="layer counts k to remove, comma-separated (default 1,2,4,8; --quick 1,2,4)")
    parser.add_argument("--region", default="uniform_0.25", help="the visual region spec (never pruned)")
    parser.add_argument("--metric", default="angular", help="score_layers metric that chooses the layers")
    parser.add_argument("--new-tokens", type=int, help="decoded tokens per generate call (default 32; --quick 4)")
    parser.add_argument("--repeats", type=int, help="measurements per model, median (default 7; --quick 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights (default: float32 cpu, bf16 cuda)")
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep every pruned copy and measure them round-robin, so load drift hits all alike "
        "(default: on on cpu; off on cuda, where it holds one copy at a time)",
    )
    args = parser.parse_args(argv)
    args.remove = args.remove or ("1,2,4" if args.quick else "1,2,4,8")
    args.remove = sorted({int(k) for k in args.remove.split(",") if k.strip()})
    args.new_tokens = args.new_tokens or (4 if args.quick else 32)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.interleave is None:
        args.interleave = args.device != "cuda"
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    return args


class StepClock:
    """A logits processor that only notes the time: ``generate`` calls it once per new token, after that token's
    forward, so consecutive calls are one decode step apart (forward with the KV cache + ``generate``'s own
    per-token work), without the prefill."""

    def __init__(self, device: str):
        self.device = device
        self.wall: list = []
        self.cpu: list = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        benchlib.sync(self.device)
        self.wall.append(benchlib.now())
        self.cpu.append(benchlib.cpu_now())
        return scores

    def intervals(self) -> tuple:
        return (
            [b - a for a, b in zip(self.wall, self.wall[1:])],
            [b - a for a, b in zip(self.cpu, self.cpu[1:])],
        )


def measure(model: Any, prompt: dict, args: argparse.Namespace) -> dict:
    """One prefill time and the N - 1 decode-step times of one ``generate`` call (seconds; wall and CPU)."""
    import torch
    from transformers import LogitsProcessorList

    with torch.inference_mode():
        benchlib.sync(args.device)
        c0, t0 = benchlib.cpu_now(), benchlib.now()
        model(**prompt, use_cache=True, logits_to_keep=1)
        benchlib.sync(args.device)
        t1, c1 = benchlib.now(), benchlib.cpu_now()
        clock = StepClock(args.device)
        tokens = args.new_tokens
        out = model.generate(
            **prompt,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
        assert out.shape[1] == prompt["input_ids"].shape[1] + tokens
    decode, decode_cpu = clock.intervals()
    return {"prefill": [t1 - t0], "prefill_cpu": [c1 - c0], "decode": decode, "decode_cpu": decode_cpu}


def pruned_copy(model: Any, k: int, scores: dict, args: argparse.Namespace) -> tuple:
    from vr_plugin import prune_outside_region

    if k == 0:
        return model, []
    clone = copy.deepcopy(model)
    record = prune_outside_region(clone, region=args.region, remove=k, scores=scores)
    return clone, record.removed


def run(args: argparse.Namespace, shape: benchlib.Shape) -> dict:  # noqa: C901 (one branch per measured mode)
    from vr_plugin import score_layers, select_layers

    model = benchlib.build_lvlm(shape, args.device, args.dtype).eval()
    model.generation_config.pad_token_id = 0
    prompt = benchlib.make_batch(shape, labels=False, batch=1, device=args.device)
    if args.dtype != "float32":
        prompt = benchlib.cast_floats(prompt, benchlib.torch_dtype(args.dtype))
    calibration = [benchlib.make_batch(shape, seed=1, labels=False, device=args.device)]
    if args.dtype != "float32":
        calibration = [benchlib.cast_floats(b, benchlib.torch_dtype(args.dtype)) for b in calibration]
    scores = score_layers(model, calibration, args.metric, progress=False)
    region = select_layers(args.region, shape.layers)
    counts = [0, *[k for k in args.remove if 0 < k]]
    outside = shape.layers - len(region)
    if counts[-1] > outside:
        raise SystemExit(f"cannot remove {counts[-1]} layers: only {outside} lie outside the region {region}")

    samples: dict = {k: {"prefill": [], "decode": [], "prefill_cpu": [], "decode_cpu": []} for k in counts}
    removed: dict = {}
    if args.interleave:
        models = {}
        for k in counts:
            models[k], removed[k] = pruned_copy(model, k, scores, args)
            measure(models[k], prompt, args)  # warm-up
        for _ in range(args.repeats):
            for k in counts:
                for key, values in measure(models[k], prompt, args).items():
                    samples[k][key].extend(values)
    else:
        for k in counts:
            current, removed[k] = pruned_copy(model, k, scores, args)
            measure(current, prompt, args)
            for _ in range(args.repeats):
                for key, values in measure(current, prompt, args).items():
                    samples[k][key].extend(values)
            if current is not model:
                del current
                benchlib.collect()
    return {"samples": samples, "removed": removed, "region": region, "scores": scores}


def summarize(result: dict, shape: benchlib.Shape) -> tuple:
    depth = shape.layers
    ratio = benchlib.ratio
    base = None
    rows = []
    for k, sample in result["samples"].items():
        decode = benchlib.median(sample["decode"])
        decode_cpu = benchlib.median(sample["decode_cpu"])
        row = {
            "k": int(k),
            "layers": depth - int(k),
            "removed": result["removed"][k],
            "ideal": depth / (depth - int(k)),
            "prefill_ms": 1000 * benchlib.median(sample["prefill"]),
            "decode_tokens_per_s": 1.0 / decode if decode > 0 else None,
            "prefill_cpu_ms": 1000 * benchlib.median(sample["prefill_cpu"]),
            "decode_cpu_ms": 1000 * decode_cpu if decode_cpu > 0 else None,
            "prefill_samples_s": sample["prefill"],
            "decode_samples_s": sample["decode"],
        }
        base = base or row
        row["prefill_speedup"] = ratio(base["prefill_ms"], row["prefill_ms"])
        row["decode_speedup"] = ratio(row["decode_tokens_per_s"], base["decode_tokens_per_s"])
        row["prefill_vs_ideal"] = ratio(row["prefill_speedup"], row["ideal"])
        row["decode_vs_ideal"] = ratio(row["decode_speedup"], row["ideal"])
        row["prefill_cpu_vs_ideal"] = ratio(ratio(base["prefill_cpu_ms"], row["prefill_cpu_ms"]), row["ideal"])
        row["decode_cpu_vs_ideal"] = ratio(ratio(base["decode_cpu_ms"], row["decode_cpu_ms"]), row["ideal"])
        rows.append(row)
    targets = [
        benchlib.target(f"decode speedup / ideal, k={row['k']}", row["decode_vs_ideal"], 0.95, higher_is_better=True)
        for row in rows
        if row["k"] > 0
    ]
    return rows, targets


COLUMNS = [
    ("k", "k removed"),
    ("layers", "layers"),
    ("removed", "removed (original index)"),
    ("ideal", "ideal L/(L−k)"),
    ("prefill_ms", "prefill ms"),
    ("prefill_speedup", "prefill speedup"),
    ("prefill_vs_ideal", "prefill / ideal"),
    ("decode_tokens_per_s", "decode tok/s"),
    ("decode_speedup", "decode speedup"),
    ("decode_vs_ideal", "decode / ideal"),
    ("prefill_cpu_vs_ideal", "prefill CPU-time / ideal"),
    ("decode_cpu_vs_ideal", "decode CPU-time / ideal"),
]


def main(argv: Optional[list] = None) -> dict:
    args = parse_args(argv)
    shape = benchlib.resolve_shape(args)
    benchlib.setup_process(args)
    info = benchlib.machine(args.device)
    print("[prune_latency] measuring ...", file=sys.stderr, flush=True)
    result = run(args, shape)
    rows, targets = summarize(result, shape)
    text = "\n".join(
        [
            f"Shape: {shape.describe()}; batch 1, prompt {shape.seq} tokens ({shape.image_tokens} image); dtype "
            f"{args.dtype}; region {args.region} ({','.join(map(str, result['region']))}) kept; layers chosen by "
            f"{args.metric} scores; {args.new_tokens} new tokens, greedy, KV cache; prefill: median of "
            f"{args.repeats}, decode: median of {args.repeats} x {args.new_tokens - 1} steps"
            f"{', models measured round-robin' if args.interleave else ''}.",
            "",
            benchlib.markdown_table(rows, COLUMNS if args.device == "cpu" else COLUMNS[:-2]),
            "",
            "Targets:",
            "",
            benchlib.target_rows(targets),
        ]
    )
    report = {
        "benchmark": "prune_latency",
        "machine": info,
        "shape": vars(shape) | {"image_tokens": shape.image_tokens},
        "settings": {
            k: getattr(args, k)
            for k in ("device", "dtype", "region", "metric", "remove", "new_tokens", "repeats", "interleave")
        },
        "scores": {str(k): v for k, v in result["scores"].items()},
        "rows": rows,
        "targets": targets,
    }
    benchlib.finish(report, text, args.out)
    return report


if __name__ == "__main__":
    main()
