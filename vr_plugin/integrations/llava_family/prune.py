"""The pruning side of the LLaVA-family hooks: every model the host's builder loads, pruned outside its region
(:func:`patch_loader`), and the ``run`` wrappers that run a host module that way (:func:`run_module_pruned`)."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["parse_prune_arguments", "patch_loader", "run_module_pruned"]


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

    from ...prune import prune_outside_region

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
