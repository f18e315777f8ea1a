"""ms-swift external plugin for the plain ``swift`` command (no launcher):

    VISUAL_REGION=uniform_0.25 swift sft --external_plugins recipes/swift/visual_region_plugin.py \
        --callbacks visual_region --tuner_type full ...

For LoRA also pass ``--target_regex "$(python -m vr_plugin.integrations.swift target_regex --model M
--visual_region uniform_0.25)"`` (the callback refuses adapters outside the region).  The launcher
``python -m vr_plugin.integrations.swift sft --visual_region ...`` does all of this and checks the flags first.
"""

from vr_plugin.integrations.swift import register

register()
