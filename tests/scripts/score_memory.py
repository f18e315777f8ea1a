"""Peak memory above the loaded model while scoring, or while keeping every hidden state (the control); MiB.

Run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the OS at once and the peak RSS tracks live memory.
Usage: python score_memory.py DEPTH:MODE ...   (MODE: score, hidden_states or forward); prints a JSON object.
"""

import gc
import json
import sys

import torch

from vr_plugin._memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from vr_plugin.score import score_layers
from vr_plugin.tiny import build_model


def measure(depth: int, mode: str) -> float:
    model = build_model("llama", num_layers=depth, hidden=256).eval()
    ids = torch.randint(3, 500, (8, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        model(**batch, use_cache=False)  # warm-up
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    if mode == "score":
        score_layers(model, [batch], "bi", progress=False)
    else:
        with torch.no_grad():
            out = model(**batch, use_cache=False, output_hidden_states=mode == "hidden_states")
        del out
    peak = (peak_rss_bytes() - base) / 2**20
    del model
    gc.collect()
    return peak


torch.set_num_threads(1)
results = {}
for item in sys.argv[1:]:
    depth, mode = item.split(":")
    results[item] = measure(int(depth), mode)
print(json.dumps(results))
