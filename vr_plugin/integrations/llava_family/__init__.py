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

The three jobs live in three modules: :mod:`.train` (arguments, LoRA targets, callback, the patched ``train``
module), :mod:`.prune` (the pruned builder and the ``run`` wrappers) and :mod:`.score` (calibration batches and the
``score`` command); their names are re-exported here.
"""

from .prune import parse_prune_arguments, patch_loader, run_module_pruned
from .score import host_prompt_batches, score_main
from .train import (
    HostRegionCallback,
    attention_implementation,
    patch_train_module,
    region_callbacks,
    region_lora_targets,
    region_options,
    region_spec,
)

__all__ = [
    "HostRegionCallback",
    "attention_implementation",
    "host_prompt_batches",
    "parse_prune_arguments",
    "patch_loader",
    "patch_train_module",
    "region_callbacks",
    "region_lora_targets",
    "region_options",
    "region_spec",
    "run_module_pruned",
    "score_main",
]
