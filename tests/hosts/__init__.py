"""Host training tools (TRL, ms-swift, LLaMA-Factory, axolotl, lmms-eval): one stack file and one test module each."""
