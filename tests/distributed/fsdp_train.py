"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo): FSDP through the HF Trainer.

accelerate turns FSDP on only for accelerator devices (its state keeps ``MULTI_CPU`` on a CPU-only machine, and
FSDP1's plugin wants a device for ``sync_module_states``), while torch's FSDP itself runs on CPU with gloo. So this
script sets accelerate's distributed type to FSDP (and its device to plain ``cpu``) before the Trainer builds its
``Accelerator``; everything after
that -- plugin, auto-wrap, sharding, optimizer, saving -- is the Trainer's and accelerate's own code path.
"""

import argparse
import hashlib
import json
import os
import sys

import torch
from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.common import LlavaSynthetic, collate, freeze_vision  # noqa: E402
from vr_plugin import RegionFreezeCallback, RegionTrainer, find_decoder_layers  # noqa: E402
from vr_plugin.callback import _clean_name, optimizer_parameters  # noqa: E402
from vr_plugin.distributed import fsdp_config  # noqa: E402


def _fsdp_on_cpu(args):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    Accelerator(cpu=True)
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
        shared["device"] = torch.device("cpu")  # not "cpu:0", which FSDP1 takes for another device than "cpu"
    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)


def _full_weights(model):
    """{name: full tensor} on every rank (a collective)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        with FSDP.summon_full_params(model, writeback=False):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


def main():
    parser = argparse.ArgumentParser()
    for name in ("--model_dir", "--result", "--output_dir"):
        parser.add_argument(name, required=True)
    parser.add_argument("--version", type=int, default=2)
    parser.add_argument("--loss_chunk", type=int, help="train through RegionTrainer with the loss in chunks")
    ns = parser.parse_args()

    model = LlavaForConditionalGeneration.from_pretrained(ns.model_dir)
    freeze_vision(model)
    if ns.version == 1:  # what a user may have: the callback must switch use_orig_params on
        config = {**fsdp_config(model, version=1), "use_orig_params": False, "sync_module_states": False}
    else:
        config = fsdp_config(model, version=2)
    args = TrainingArguments(
        output_dir=ns.output_dir, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to="none",
        save_strategy="no", remove_unused_columns=False, use_cpu=True, ddp_backend="gloo", fsdp=True,
        fsdp_config=config, logging_steps=1,
    )  # fmt: skip
    _fsdp_on_cpu(args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = RegionFreezeCallback("uniform_0.25")
    chunking = {"loss_chunk": ns.loss_chunk} if ns.loss_chunk else {}
    trainer = (RegionTrainer if chunking else Trainer)(
        model=model,
        args=args,
        train_dataset=LlavaSynthetic(model.config, n=8),
        data_collator=collate,
        callbacks=[callback],
        **chunking,
    )
    trainer.train()
    wrapped = trainer.model_wrapped
    names = {id(p): _clean_name(n) for n, p in wrapped.named_parameters()}
    after = {_clean_name(n): w for n, w in _full_weights(wrapped).items()}
    trainable = sorted(_clean_name(n) for n, p in wrapped.named_parameters() if p.requires_grad)
    sha = hashlib.sha256()
    for name in trainable:
        sha.update(after[name].float().numpy().tobytes())
    layers = find_decoder_layers(wrapped).layers
    report = {
        "wrapper": ",".join(c.__name__ for c in type(wrapped).__mro__[:3]),
        "layers_wrapped": all(type(m).__name__.startswith(("FullyShardedDataParallel", "FSDP")) for m in layers),
        "trainable": trainable,
        "changed": sorted(n for n in after if not torch.equal(after[n], before[n])),
        "trained_digest": sha.hexdigest(),
        "optimizer_names": sorted(names.get(id(p), "?") for p in optimizer_parameters(trainer.optimizer)),
        "use_orig_params": bool(getattr(trainer.accelerator.state.fsdp_plugin, "use_orig_params", True)),
    }
    if ns.version == 2:  # FSDP1's full-state-dict gather crashes (SIGSEGV) on CPU/gloo with torch 2.13
        trainer.save_model(os.path.join(ns.output_dir, "final"))
    with open(f"{ns.result}.{os.environ.get('RANK', '0')}.json", "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main()
