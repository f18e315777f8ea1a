"""What a frozen nf4 decoder layer costs in a checkpointed training step on CPU, in isolation.

Builds N Llama-3-8B-width decoder layers (hidden 4096, MLP 14336, 32/8 heads), replaces their linear maps by
bitsandbytes nf4 ``Linear4bit`` (bf16 compute), freezes them, and runs forward + backward of one seq-512 sample
through them with gradient checkpointing, the input requiring grad (as the hidden states reaching frozen layers
between region layers do). Prints stored bytes, resident bytes at rest and the step's peak RSS above the bare
interpreter, as one JSON line. Run it for N = 1, 2, 4: the slope is the per-frozen-layer cost that the memory
proxy's fit should see once loading artefacts are out of the way (see RESULTS.md).

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/nf4_frozen_layers.py 4
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vr_plugin._memory import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402


def nf4_layers(n: int):
    """``n`` frozen decoder layers at the Llama-3-8B widths with nf4 linear maps, and their config."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=n
    )
    config._attn_implementation = "sdpa"
    layers = []
    for index in range(n):
        layer = LlamaDecoderLayer(config, index).to(torch.bfloat16)
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    quantized = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16
                    )
                    weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                    quantized.weight = weight._quantize("cpu")
                    setattr(parent, name, quantized)
        layer.requires_grad_(False)
        layers.append(layer)
        gc.collect()
    return layers, config


def main() -> None:
    """Measure one checkpointed step through N frozen nf4 layers (N from the command line, default 1)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.set_num_threads(2)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    base = rss_bytes()
    layers, config = nf4_layers(n)
    stored = sum(p.numel() * p.element_size() for layer in layers for p in layer.parameters())
    resting = rss_bytes() - base
    x = torch.randn(1, 512, 4096, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(512)[None]
    rope = LlamaRotaryEmbedding(config)(x, positions)

    def run(hidden: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        out = layer(hidden, position_embeddings=rope, position_ids=positions)
        return out[0] if isinstance(out, tuple) else out

    reset_peak_rss()
    hidden = x
    for layer in layers:
        hidden = checkpoint(run, hidden, layer, use_reentrant=False)
    hidden.float().pow(2).mean().backward()
    peak = peak_rss_bytes() - base
    gb = 1e9
    print(json.dumps({"layers": n, "stored_gb": stored / gb, "resting_gb": resting / gb, "step_peak_gb": peak / gb}))


if __name__ == "__main__":
    main()
