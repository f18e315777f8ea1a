"""``python -m vr_plugin.integrations.bunny.run [--prune K --prune_scores S | --prune_layers I,J] MODULE ARGS``:
run a Bunny module (``bunny.eval.model_vqa_loader``, ``bunny.serve.cli``, ...) on models pruned outside their region."""

import sys

from vr_plugin.integrations.bunny import BUILDER_MODULE
from vr_plugin.integrations.llava_family import run_module_pruned

if __name__ == "__main__":
    run_module_pruned(BUILDER_MODULE, sys.argv[1:], prog="vr_plugin.integrations.bunny.run")
