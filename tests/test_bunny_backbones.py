"""The LLM classes Bunny wraps (transformers' own versions, no Bunny checkout needed): decoder path, LoRA targets."""

import pytest
import transformers

from vr_plugin import find_decoder_layers
from vr_plugin.lora import region_targets
from vr_plugin.tiny import text_kwargs

# Bunny --model_type -> (transformers config / model class, what Bunny's find_all_linear_names collects)
LLAMA_LIKE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
BACKBONES = {
    "phi-2": ("PhiConfig", "PhiForCausalLM", {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}),
    "phi-3": ("Phi3Config", "Phi3ForCausalLM", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "stablelm-2": ("StableLmConfig", "StableLmForCausalLM", LLAMA_LIKE),
    "qwen1.5-1.8b": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE),
    "llama3-8b": ("LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE),
}


@pytest.mark.parametrize("model_type", sorted(BACKBONES))
def test_backbone_layers_and_region_lora_targets(model_type):
    config_name, model_name, linears = BACKBONES[model_type]
    kwargs = text_kwargs(num_layers=8, hidden=32)
    if model_type == "phi-2":
        kwargs.pop("num_key_value_heads")
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))
    layers, name = find_decoder_layers(model)
    assert name == "model.layers" and len(layers) == 8
    targets = region_targets(model, "uniform_0.25")
    assert list(targets.per_layer) == [1, 7]
    assert {sub.rsplit(".", 1)[-1] for subs in targets.per_layer.values() for sub in subs} == linears
    assert all(n.startswith(("model.layers.1.", "model.layers.7.")) for n in targets.names)
