"""lmms-eval integration: evaluate a checkpoint pruned outside its visual region without writing it to disk first.

Checkpoints that ``vr-plugin train`` / ``prune`` save need nothing from here: they hold the processor, tokenizer and
chat template and load with ``lmms-eval --model llava_hf --model_args pretrained=DIR``.  This module adds the model
``vr_pruned``: lmms-eval's own ``llava_hf`` (its simple and its chat class, subclassed) whose model is pruned in memory
by :func:`vr_plugin.prune.prune_outside_region` right after it loads::

    python -m vr_plugin.integrations.lmms_eval --model vr_pruned \\
        --model_args pretrained=./runs/vr,scores=scores.json,remove=4 --tasks mme --batch_size 1

The prune options are ``vr-plugin prune``'s flags: ``scores=`` + ``remove=`` (a count or a ratio) or ``layers=``
(``2;3``, ``[2,3]``, ``10:14``: lmms-eval splits ``model_args`` at commas), ``visual_region=``, ``allow_region=``,
``allow_visual_entry=``.  The launcher registers ``vr_pruned`` in lmms-eval's model registry and runs lmms-eval's own
CLI (``lmms_eval.cli.dispatch.main``).  Installed with an entry point in the group ``lmms_eval.models`` naming
:func:`manifests`, plain ``lmms-eval --model vr_pruned`` finds it too.  lmms-eval is imported lazily: importing this
module needs nothing of it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

__all__ = [
    "MODEL_ID",
    "PRUNE_OPTIONS",
    "llava_hf_loglikelihood",
    "manifests",
    "main",
    "prune_options",
    "pruned_class",
    "register",
]

logger = logging.getLogger(__name__)

MODEL_ID = "vr_pruned"
MODULE = "vr_plugin.integrations.lmms_eval"  # not __name__: under ``python -m`` that is "__main__"
PRUNE_OPTIONS = ("scores", "remove", "layers", "visual_region", "allow_region", "allow_visual_entry")
# class name here -> (module, class) of the lmms-eval model it prunes
_BASES = {
    "VRPrunedLlavaHf": ("lmms_eval.models.simple.llava_hf", "LlavaHf"),
    "VRPrunedLlavaHfChat": ("lmms_eval.models.chat.llava_hf", "LlavaHf"),
}
_BUILT: dict = {}


def _flag(value: Any, name: str) -> bool:
    """A boolean model arg: lmms-eval passes ``true`` / ``false`` as bools."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ValueError(f"{name}={value!r}: give true or false")


def _remove_amount(value: Any, depth: int) -> Any:
    """``remove=``: a layer count ``0..depth-1`` or a ratio in (0, 1), as ``vr-plugin prune --remove`` takes."""
    given = value
    if isinstance(value, str):
        try:
            value = float(value) if "." in value else int(value)
        except ValueError:
            value = None
    if isinstance(value, float) and value.is_integer() and value >= 1:
        value = int(value)
    counts = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < depth
    if counts or (isinstance(value, float) and 0.0 < value < 1.0):
        return value
    raise ValueError(f"remove={given!r}: give a layer count 0..{depth - 1} (4) or a ratio in (0, 1) (0.125)")


def _layers_text(value: Any) -> str:
    """``layers=`` / ``visual_region=`` as the spec grammar reads them: ``2;3`` and ``[2,3]`` mean ``2,3``
    (lmms-eval splits ``model_args`` at commas outside brackets)."""
    return str(value).strip().strip("[]()\"'").replace(";", ",")


def _check_scores(path: Any, config: Any) -> str:
    """``scores=``: a scores file of this model (same LLM shape and original depth), read before weights load."""
    from ..locate import check_same_model
    from ..score import load_scores

    if not isinstance(path, str) or not path:
        raise ValueError(f"scores={path!r}: give the path of a scores JSON written by vr-plugin score")
    try:
        identity = load_scores(path).identity
    except FileNotFoundError as error:
        raise ValueError(f"scores={path!r}: {error}") from None
    if identity:
        check_same_model(identity, config, f"scores={path!r}", "pretrained")
    return path


def _check_pretrained(pretrained: Any) -> None:
    """``pretrained=``: a complete model directory (or hub id) with a config; adapter-only directories refused."""
    from ..model_io import adapter_base
    from ..outputs import check_complete, check_weight_files
    from ..training import check_model_dir

    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"pretrained={pretrained!r}: give a model directory")
    try:
        check_model_dir(pretrained)
    except FileNotFoundError as error:
        raise ValueError(f"pretrained={pretrained!r}: {error}") from None
    if os.path.isdir(pretrained):
        check_complete(pretrained)
        check_weight_files(pretrained)
        if adapter_base(pretrained) is not None:
            raise ValueError(
                f"pretrained={pretrained!r} is a peft adapter directory; give a merged model (vr-plugin train "
                "--merge_lora) or save a pruned one with vr-plugin prune"
            )


def prune_options(pretrained: Any, model_args: dict) -> dict:
    """Pop :data:`PRUNE_OPTIONS` from ``model_args`` and check them against ``pretrained``'s config (no weights).

    Returns the keyword arguments of :func:`vr_plugin.prune.prune_outside_region`; raises ``ValueError`` naming the
    bad model arg.
    """
    from transformers import AutoConfig

    from ..locate import num_layers_from_config
    from ..region import check_region_spec

    given = {key: model_args.pop(key) for key in PRUNE_OPTIONS if key in model_args}
    _check_pretrained(pretrained)
    if ("remove" in given) == ("layers" in given):
        raise ValueError(f"{MODEL_ID} needs remove=COUNT|RATIO (with scores=S.json) or layers=I;J, exactly one")
    config = AutoConfig.from_pretrained(pretrained)
    depth = num_layers_from_config(config)
    options = {key: _flag(given[key], key) for key in ("allow_region", "allow_visual_entry") if key in given}
    if "visual_region" in given:
        options["region"] = _layers_text(given["visual_region"])
        check_region_spec(config, options["region"], option="visual_region")
    if "layers" in given:
        options["remove"] = check_region_spec(config, _layers_text(given["layers"]), option="layers")
        if "scores" in given:
            raise ValueError("layers= names the layers to remove; scores= only goes with remove=")
        return options
    if "scores" not in given:
        raise ValueError("remove= chooses the lowest-scoring layers: it needs scores=S.json (vr-plugin score)")
    options["remove"] = _remove_amount(given["remove"], depth)
    options["scores"] = _check_scores(given["scores"], config)
    return options


def _check_engine() -> None:
    """Pruning swaps modules of the loaded model: refused where accelerate shards it (FSDP, DeepSpeed)."""
    for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            raise ValueError(
                f"{MODEL_ID} prunes the model after it loads, which {variable}=1 shards; launch with plain "
                "data parallelism (accelerate launch --multi_gpu) or save a pruned checkpoint with vr-plugin prune"
            )


def _single_process() -> bool:
    from accelerate import PartialState

    return PartialState().num_processes == 1


def llava_hf_loglikelihood(self: Any, requests: list) -> list:
    """lmms-eval's ``llava_hf`` log-likelihood (mean NLL of the continuation, greedy match), with its context tokens
    counted on the prompt *with* its images.

    lmms-eval 0.7.3's own method tokenizes the context without the images, which transformers 5's processors refuse
    and which older ones count short (the ``<image>`` token not expanded to its patch tokens, so the loss took in the
    end of the prompt); and it compares the continuation with the logits one position late. Same return convention:
    ``(loss, is_greedy)`` per request, lower loss = likelier (lmms-eval's multiple choice takes the argmin).
    """
    import torch
    from tqdm import tqdm

    processor = self._image_processor
    image_token = getattr(processor, "image_token", "<image>")
    if self.chat_template is not None:
        self.tokenizer.chat_template = self.chat_template
    elif self.tokenizer.chat_template is None:
        from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE

        self.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    results = []
    for context, target, doc_to_visual, doc_id, task, split in tqdm(
        [request.args for request in requests], disable=self.rank != 0, desc="Model Responding"
    ):
        doc = self.task_dict[task][split][doc_id]
        continuation = target if isinstance(target, str) else target(doc)
        visuals = [visual for group in [doc_to_visual(doc)] for visual in group]
        user = {"role": "user", "content": " ".join([image_token] * len(visuals)) + f"\n{context}"}
        prompt = self.tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        whole = self.tokenizer.apply_chat_template(
            [user, {"role": "assistant", "content": continuation}], tokenize=False
        )
        inputs = processor(text=[whole], images=visuals, return_tensors="pt").to(self._device, self.model.dtype)
        start = processor(text=[prompt], images=visuals, return_tensors="pt")["input_ids"].shape[1]
        labels = inputs["input_ids"].clone()
        labels[:, :start] = -100
        with torch.inference_mode():
            outputs = self.model(**inputs, labels=labels)
        greedy = outputs.logits[:, start - 1 : -1].argmax(dim=-1)
        results.append((float(outputs.loss), bool((greedy == inputs["input_ids"][:, start:]).all())))
    return results


def pruned_class(base: type, name: Optional[str] = None, methods: Optional[dict] = None) -> type:
    """A subclass of the lmms-eval model class ``base`` whose model is pruned outside its region after loading.

    ``base`` must keep its model at ``self.model`` (lmms-eval's HF models do) and take ``pretrained=``. The prune
    record is kept as ``self.pruning``; on one process an empty ``device_map`` becomes ``device`` (transformers 5
    refuses ``device_map=""``, lmms-eval's ``llava_hf`` default). ``methods`` are set on the class too (fixes of
    ``base``'s own, e.g. :func:`llava_hf_loglikelihood`).
    """

    def __init__(self, pretrained: str = "", **model_args: Any) -> None:
        from ..prune import prune_outside_region

        options = prune_options(pretrained, model_args)
        _check_engine()
        if not model_args.get("device_map") and _single_process():
            model_args["device_map"] = str(model_args.get("device") or "cuda")
        base.__init__(self, pretrained=pretrained, **model_args)
        self.pruning = prune_outside_region(self.model, **options)
        logger.info("%s: removed layers %s of %s", MODEL_ID, self.pruning.removed, pretrained)

    cls_name = name or f"VRPruned{base.__name__}"
    doc = f"lmms-eval's {base.__module__}.{base.__name__}, pruned outside the visual region after loading."
    namespace = {"__init__": __init__, "__doc__": doc, "__module__": MODULE, **(methods or {})}
    return type(cls_name, (base,), namespace)


def __getattr__(name: str) -> type:
    """The lmms-eval model classes of :data:`MODEL_ID`, built on first use (importing lmms-eval only then)."""
    if name not in _BASES:
        raise AttributeError(f"module {MODULE!r} has no attribute {name!r}")
    if name not in _BUILT:
        import importlib

        module, attribute = _BASES[name]
        base = getattr(importlib.import_module(module), attribute)
        _BUILT[name] = pruned_class(base, name, {"loglikelihood": llava_hf_loglikelihood})
    return _BUILT[name]


def manifests() -> list:
    """lmms-eval model manifests (entry-point group ``lmms_eval.models``): ``vr_pruned``, simple and chat."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=MODEL_ID,
            simple_class_path=f"{MODULE}.VRPrunedLlavaHf",
            chat_class_path=f"{MODULE}.VRPrunedLlavaHfChat",
        )
    ]


def register() -> None:
    """Register :func:`manifests` in lmms-eval's model registry (``lmms_eval.models.MODEL_REGISTRY_V2``)."""
    from lmms_eval import models

    for manifest in manifests():
        models.MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
        models.AVAILABLE_MODELS[manifest.model_id] = manifest.chat_class_path.rsplit(".", 1)[-1]


def main(argv: Optional[list] = None) -> None:
    """``python -m vr_plugin.integrations.lmms_eval ARGS``: ``lmms-eval ARGS`` with ``vr_pruned`` registered."""
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    register()
    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    lmms_eval_main()


if __name__ == "__main__":
    main()
