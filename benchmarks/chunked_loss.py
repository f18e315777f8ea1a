"""Peak memory of the loss over the vocabulary: the model's own (whole logits) vs ``--loss_chunk`` (vr_plugin.loss).

The last step of every training step at the Llama-3-8B head: final hidden states (bf16, requiring grad, as they do
in any region run) through a frozen bf16 ``lm_head`` (4096 x 128,256, as the hybrid keeps it) into the causal-LM
loss, then backward to the hidden states. Each mode runs in its own forked process; the peak RSS above the resting
weights and inputs is what the loss itself costs, next to the analytic size of the whole logits. Every position
is labelled (the worst case for chunking: an LLaVA sample's image and prompt positions would get no logits at all).

    python benchmarks/chunked_loss.py                 # seq 2048, about 3 minutes on 2 CPU cores
    python benchmarks/chunked_loss.py --quick         # tiny widths, seconds (the test suite)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchlib  # noqa: E402

GB = 1e9
MODES = ("whole logits", "loss_chunk 1024", "loss_chunk 256")


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="labelled positions (batch 1)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny widths, for the test suite")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false", help="run the modes in this process")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq, args.hidden, args.vocab = 96, 64, 3000
    return args


def measure(mode: str, args: argparse.Namespace) -> dict:
    """One loss + backward in ``mode``: peak RSS above the resting head and inputs, seconds, the loss."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from vr_plugin._memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from vr_plugin.loss import chunked_cross_entropy

    benchlib.set_malloc_mmap_threshold()

    def loss_of(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if mode == "whole logits":
            return ForCausalLMLoss(head(hidden), labels, head.out_features)
        return chunked_cross_entropy(head, hidden, labels, chunk=int(mode.split()[-1]))

    small = torch.nn.Linear(8, 16, bias=False, dtype=torch.bfloat16)  # first calls import and set up lazily
    loss_of(small, torch.randn(1, 4, 8, dtype=torch.bfloat16, requires_grad=True), torch.zeros(1, 4).long()).backward()
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    head.weight.normal_(0, 0.02, generator=generator)
    hidden = torch.randn(1, args.seq, args.hidden, generator=generator, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.seq), generator=generator)
    base = rss_bytes()
    reset_peak_rss()
    started = benchlib.now()
    loss = loss_of(head, hidden, labels)
    loss.backward()
    seconds = benchlib.now() - started
    return {"peak_bytes": peak_rss_bytes() - base, "seconds": seconds, "loss": float(loss)}


def rows_of(results: dict, args: argparse.Namespace) -> list:
    whole = results.get("whole logits", {})
    logits_gb = args.seq * args.vocab * 2 / GB
    rows = []
    for mode in MODES:
        result = results.get(mode, {})
        rows.append(
            {
                "mode": mode,
                "peak_gb": result.get("peak_bytes", float("nan")) / GB,
                "vs_whole": benchlib.ratio(result.get("peak_bytes"), whole.get("peak_bytes")),
                "saved_gb": (whole.get("peak_bytes", float("nan")) - result.get("peak_bytes", float("nan"))) / GB,
                "seconds": result.get("seconds"),
                "loss": result.get("loss"),
                "logits_bf16_gb": logits_gb,
                "error": result.get("error"),
            }
        )
    return rows


def main(argv: Optional[list] = None) -> dict:
    args = parse_args(argv)
    benchlib.setup_process(args)
    info = benchlib.machine("cpu")
    benchlib.preload("transformers.loss.loss_utils", "vr_plugin.loss", "torch.utils.checkpoint")
    results = {}
    for mode in MODES:
        print(f"[chunked_loss] {mode} at seq {args.seq}, vocab {args.vocab:,} ...", file=sys.stderr, flush=True)
        outcome = benchlib.run_isolated(args.isolate, measure, mode, args)
        results[mode] = outcome["result"] if outcome["ok"] else {"error": outcome["error"]}
    rows = rows_of(results, args)
    columns = [
        ("mode", "mode"),
        ("peak_gb", "loss + backward peak (GB)"),
        ("vs_whole", "vs whole"),
        ("saved_gb", "saved (GB)"),
        ("seconds", "seconds"),
        ("loss", "loss"),
    ]
    text = (
        f"Loss over the vocabulary at seq {args.seq}, hidden {args.hidden}, vocab {args.vocab:,} (bf16 head, frozen; "
        f"the whole logits are {rows[0]['logits_bf16_gb']:.2f} GB in bf16)\n\n" + benchlib.markdown_table(rows, columns)
    )
    report = {"benchmark": "chunked_loss", "machine": info, "args": vars(args), "rows": rows}
    benchlib.finish(report, text, args.out)
    return report


if __name__ == "__main__":
    main()
