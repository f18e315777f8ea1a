"""Hooks shared by LLaVA-derived training scripts: haotian-liu/LLaVA's ``llava/train/train.py`` and its fork in
BAAI-DCAI/Bunny (``bunny/train/train.py``).

Both scripts parse ``(ModelArguments, DataArguments, TrainingArguments)``, make every ``requires_grad`` change of
their own, build ``LoraConfig(target_modules=find_all_linear_names(model))``, then construct their Trainer subclass
and auto-resume when ``output_dir`` holds ``checkpoint-*``. vr_plugin meets them at three points, either through a
launcher that patches the module globals at run time (:func:`patch_train_module`) or through the small source
patches in ``patches/``:

1. ``TrainingArguments`` gains the region flags (:class:`vr_plugin.args.RegionArguments`);
2. the LoRA targets become the region layers' linear modules (:func:`region_lora_targets`);
3. the Trainer gets a :class:`HostRegionCallback` (:func:`region_callbacks`), which freezes in ``on_init_end``,
   after every change the script made and before the optimizer or DeepSpeed engine exists.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch

from ..args import RegionArguments, check_region_arguments, extend_arguments
from ..callback import RegionFreezeCallback
from ..distributed import gathered
from ..locate import unwrap_model
from ..lora import region_targets

__all__ = [
    "HostRegionCallback",
    "patch_train_module",
    "region_callbacks",
    "region_lora_targets",
    "region_options",
    "region_spec",
]

logger = logging.getLogger(__name__)

# The training arguments most recently parsed by a patched host script (find_all_linear_names gets only the model).
_ACTIVE: dict = {"args": None}


def region_spec(args: Any) -> Optional[str]:
    """``--visual_region`` or ``--tune_layers`` of the parsed host arguments (``None``: no region requested)."""
    return getattr(args, "visual_region", None) or getattr(args, "tune_layers", None)


def region_options(args: Any) -> dict:
    """``apply_visual_region`` options of the host arguments (``--freeze_mm_mlp_adapter``: projector stays frozen)."""
    options = RegionArguments.region_options(args)
    if getattr(args, "freeze_mm_mlp_adapter", False):
        options["tune_projector"] = False
    return options


def region_lora_targets(model: torch.nn.Module, args: Any) -> Optional[str]:
    """The anchored regex of the region layers' linear modules for ``LoraConfig(target_modules=...)``, or ``None``."""
    spec = region_spec(args)
    if spec is None:
        return None
    return region_targets(model, spec, layers_path=getattr(args, "layers_path", None)).regex()


def _gathered(param: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a parameter, gathering it first under DeepSpeed ZeRO-3 (a collective: every rank calls it)."""
    with gathered([param]):
        return param.data.detach().cpu().clone()


class HostRegionCallback(RegionFreezeCallback):
    """``RegionFreezeCallback`` plus what LLaVA-family scripts need.

    * (as ``RegionFreezeCallback``) refuses, before DeepSpeed loads anything, to auto-resume a ``checkpoint-*``
      trained with another region;
    * makes intermediate LoRA checkpoints loadable: ``config.json`` (with the region) and
      ``non_lora_trainables.bin`` (the projector) beside the adapter, as the scripts write only at the end.
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        super().on_save(args, state, control, model=model, **kwargs)
        if model is None or not hasattr(model, "peft_config"):
            return
        trainables = {n: _gathered(p) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        if state.is_world_process_zero:
            directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(directory, exist_ok=True)
            unwrap_model(model).config.save_pretrained(directory)
            torch.save(trainables, os.path.join(directory, "non_lora_trainables.bin"))


def region_callbacks(args: Any) -> list:
    """``[HostRegionCallback]`` when the host arguments ask for a region, else ``[]``."""
    spec = region_spec(args)
    if spec is None:
        return []
    check_region_arguments(args)
    if getattr(args, "tune_mm_mlp_adapter", False):
        raise ValueError(
            f"--visual_region {spec!r} is for visual instruction tuning; with --tune_mm_mlp_adapter True "
            "(projector pretraining) the LLM is frozen anyway"
        )
    return [HostRegionCallback(spec, **region_options(args))]


def _region_trainer(base: type) -> type:
    """A subclass of the host's Trainer that passes :func:`region_callbacks` to the constructor."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)  # Trainer(model, args, ...)
        extra = region_callbacks(training_args)
        if extra:
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + extra
        base.__init__(self, *args, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def patch_train_module(module: Any, trainer_name: str) -> None:
    """Patch a LLaVA-family ``train`` module in place so its unmodified ``train()`` honours the region flags.

    ``trainer_name`` is its Trainer subclass (``LLaVATrainer`` / ``BunnyTrainer``). Idempotent.
    """
    if getattr(module, "_vr_plugin_patched", False):
        return
    extended = extend_arguments(module.TrainingArguments)
    if extended is not module.TrainingArguments:
        parent_post_init: Callable = extended.__post_init__

        def __post_init__(self: Any) -> None:
            parent_post_init(self)  # RegionArguments' checks, then the host's own
            _ACTIVE["args"] = self

        extended.__post_init__ = __post_init__
        # home the class under the host's own name so Trainer can pickle the arguments (training_args.bin)
        extended.__module__, extended.__qualname__ = module.__name__, "TrainingArguments"
        module.TrainingArguments = extended

    original_targets = module.find_all_linear_names

    def find_all_linear_names(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        targets = region_lora_targets(model, _ACTIVE["args"]) if _ACTIVE["args"] is not None else None
        return targets if targets is not None else original_targets(model, *args, **kwargs)

    module.find_all_linear_names = find_all_linear_names
    setattr(module, trainer_name, _region_trainer(getattr(module, trainer_name)))
    module._vr_plugin_patched = True


def attention_implementation() -> Optional[str]:
    """``flash_attention_2`` where flash-attn and a GPU are there, else ``None`` (transformers' default), logged."""
    choice = os.environ.get("VR_ATTN_IMPLEMENTATION")
    if choice:
        return None if choice == "default" else choice
    try:
        import flash_attn  # noqa: F401

        if torch.cuda.is_available():
            return "flash_attention_2"
        reason = "no CUDA device"
    except ImportError:
        reason = "flash-attn is not installed"
    logger.info("attention: %s, so the model uses transformers' default instead of flash_attention_2", reason)
    return None


def patch_loader(
    builder: Any,
    *,
    remove: Any = 0,
    scores: Any = None,
    allow_region: bool = False,
) -> Callable:
    """Wrap ``builder.load_pretrained_model`` so every model it returns is pruned outside its region.

    Already-imported references (``from ...builder import load_pretrained_model`` in eval or serve modules) are
    patched too. Returns the wrapper.
    """
    import sys

    from ..prune import prune_outside_region

    original = getattr(builder.load_pretrained_model, "__wrapped__", builder.load_pretrained_model)

    def load_pretrained_model(*args: Any, **kwargs: Any) -> Any:
        tokenizer, model, image_processor, context_len = original(*args, **kwargs)
        if remove:
            prune_outside_region(model, remove=remove, scores=scores, allow_region=allow_region)
        return tokenizer, model, image_processor, context_len

    load_pretrained_model.__wrapped__ = original
    for module in list(sys.modules.values()):
        if getattr(module, "load_pretrained_model", None) in (original, builder.load_pretrained_model):
            module.load_pretrained_model = load_pretrained_model
    builder.load_pretrained_model = load_pretrained_model
    return load_pretrained_model


def parse_prune_arguments(argv: list, prog: str) -> tuple:
    """``--prune K|RATIO --prune_scores PATH --prune_layers I,J --allow_region MODULE ARGS...`` of a ``run`` wrapper."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a host module (an eval script, the CLI, ...) with every loaded model pruned outside its "
        "visual region.",
        epilog=f"example: python -m {prog} --prune 4 --prune_scores scores.json llava.eval.model_vqa_loader "
        "--model-path ./checkpoints/llava-v1.5-7b-vr25 --question-file q.jsonl --image-folder images "
        "--answers-file answers.jsonl",
    )
    parser.add_argument("--prune", default="0", help="how many layers to remove (count) or a ratio in (0, 1)")
    parser.add_argument("--prune_scores", default=None, help="scores JSON from vr_plugin's score command")
    parser.add_argument("--prune_layers", default=None, help="explicit layers to remove, e.g. 3,10 (no scores)")
    parser.add_argument("--allow_region", action="store_true", help="let region layers be removed too")
    parser.add_argument("module", help="the module to run as __main__, e.g. llava.eval.model_vqa_loader")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments")
    ns = parser.parse_args(argv)
    if ns.prune_layers:
        remove: Any = [int(i) for i in ns.prune_layers.split(",")]
    else:
        remove = float(ns.prune) if "." in ns.prune else int(ns.prune)
        if remove and not ns.prune_scores:
            parser.error("--prune needs --prune_scores (or give --prune_layers)")
    return ns, remove


def run_module_pruned(builder_name: str, argv: list, prog: str) -> None:
    """Entry point of the ``run`` wrappers: patch the builder, then run the target module as ``__main__``."""
    import importlib
    import runpy
    import sys

    ns, remove = parse_prune_arguments(argv, prog)
    patch_loader(
        importlib.import_module(builder_name), remove=remove, scores=ns.prune_scores, allow_region=ns.allow_region
    )
    sys.argv = [ns.module, *ns.args]
    runpy.run_module(ns.module, run_name="__main__", alter_sys=True)


def host_prompt_batches(
    host: Any,
    tokenizer: Any,
    image_processor: Any,
    model: Any,
    json_path: str,
    image_folder: str,
    conv_mode: str,
    limit: Optional[int] = None,
) -> Any:
    """Batches of one as the host's eval scripts build them (conversation template, ``tokenizer_image_token``,
    ``process_images``), from the human turns of a LLaVA-format file; for :func:`vr_plugin.score_layers`.

    ``host`` names the host's modules: ``conversation``, ``mm_utils`` and ``constants``.
    """
    import inspect

    from PIL import Image

    from ..data import load_conversations, record_images

    constants, conversation, mm_utils = host.constants, host.conversation, host.mm_utils
    takes_sizes = "image_sizes" in inspect.signature(type(model).forward).parameters  # LLaVA yes, Bunny no
    if conv_mode not in conversation.conv_templates:
        raise ValueError(f"--conv-mode {conv_mode!r} unknown; choose from {sorted(conversation.conv_templates)}")
    for record in load_conversations(json_path)[:limit]:
        question = "\n".join(
            t["value"].replace(constants.DEFAULT_IMAGE_TOKEN, "").strip()
            for t in record["conversations"]
            if t["from"] in ("human", "user")
        )
        images = record_images(record)
        conv = conversation.conv_templates[conv_mode].copy()
        conv.append_message(conv.roles[0], (constants.DEFAULT_IMAGE_TOKEN + "\n" if images else "") + question)
        conv.append_message(conv.roles[1], None)
        ids = mm_utils.tokenizer_image_token(
            conv.get_prompt(), tokenizer, constants.IMAGE_TOKEN_INDEX, return_tensors="pt"
        ).unsqueeze(0)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if images:
            image = Image.open(os.path.join(image_folder, images[0])).convert("RGB")
            batch["images"] = mm_utils.process_images([image], image_processor, model.config).to(model.dtype)
            if takes_sizes:
                batch["image_sizes"] = [image.size]
        yield batch


def score_main(
    host: Any,
    argv: list,
    prog: str,
    default_conv_mode: str,
    load: Callable[[Any], tuple],
    add_arguments: Optional[Callable[[Any], None]] = None,
) -> dict:
    """``score`` entry of an integration: load a checkpoint with ``load(namespace) -> (tokenizer, model,
    image_processor)`` (the host's builder), score its layers on calibration prompts, write the JSON report."""
    import argparse

    from ..score import METRICS, score_layers

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Score the LLM layers of a checkpoint on calibration "
        "images (for pruning outside the visual region).",
    )
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--data", required=True, help="LLaVA-format JSON whose human turns are the prompts")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--metric", default="bi", choices=[m for m in METRICS if m != "weight_change"])
    parser.add_argument("--out", required=True, help="scores JSON to write")
    parser.add_argument("--conv-mode", default=default_conv_mode)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N records")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if add_arguments is not None:
        add_arguments(parser)
    ns = parser.parse_args(argv)
    tokenizer, model, image_processor = load(ns)
    if ns.device == "cpu":
        model = model.float()  # the builders load fp16; score in fp32 on CPU
    batches = list(
        host_prompt_batches(host, tokenizer, image_processor, model, ns.data, ns.images, ns.conv_mode, ns.limit)
    )
    return score_layers(
        model,
        batches,
        ns.metric,
        out=ns.out,
        model_id=ns.model_path,
        data_description=f"{ns.data} ({len(batches)} records, images {ns.images})",
    )
