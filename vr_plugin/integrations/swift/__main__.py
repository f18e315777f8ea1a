"""``python -m vr_plugin.integrations.swift sft --visual_region SPEC <swift sft flags>``."""

from vr_plugin.integrations.swift import main

if __name__ == "__main__":
    main()
