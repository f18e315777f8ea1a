"""Tiny LVLMs built from configs, for the demo, the benchmarks and the tests.

Nothing is downloaded: configs are written here, weights are random, the
tokenizer is trained locally.  :func:`build_model` gives an in-memory model of
one of :data:`ARCHITECTURES`; :func:`save_tiny_model` writes a complete model
directory (config, safetensors, tokenizer, processor) that loads back with the
ordinary ``from_pretrained`` calls.
"""

from __future__ import annotations

from typing import Any, Optional

import transformers

__all__ = ["ARCHITECTURES", "build_config", "build_model", "text_kwargs"]

# name -> (config class, model class), resolved lazily so older transformers can import this module
_CLASSES = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
    "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration"),
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration"),
    "paligemma": ("PaliGemmaConfig", "PaliGemmaForConditionalGeneration"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}
ARCHITECTURES = tuple(_CLASSES)

IMAGE_SIZE = 32
PATCH = 8
VOCAB = 512
IMAGE_TOKEN_ID = VOCAB - 1


def available(arch: str) -> bool:
    """Whether the installed transformers has this architecture."""
    config_name, model_name = _CLASSES[arch]
    return hasattr(transformers, config_name) and hasattr(transformers, model_name)


def text_kwargs(num_layers: int = 8, hidden: int = 32, vocab: int = VOCAB, **extra: Any) -> dict:
    """Keyword arguments of a tiny Llama-family text config."""
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(extra)
    return kwargs


def _vision(model_type: str, hidden: int = 32, **extra: Any) -> dict:
    kwargs = dict(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    kwargs.update(extra)
    return kwargs


def build_config(arch: str, num_layers: int = 8, hidden: int = 32, **overrides: Any) -> Any:
    """A tiny config of ``arch`` whose LLM has ``num_layers`` decoder layers."""
    if arch not in _CLASSES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if not available(arch):
        raise ValueError(f"transformers {transformers.__version__} has no {_CLASSES[arch][1]}")
    config_cls = getattr(transformers, _CLASSES[arch][0])
    text = dict(model_type="llama", **text_kwargs(num_layers, hidden))
    if arch == "llama":
        return config_cls(**text_kwargs(num_layers, hidden), **overrides)
    if arch in ("llava", "llava_next"):
        kwargs = dict(
            text_config=text, vision_config=_vision("clip_vision_model", hidden), image_token_index=IMAGE_TOKEN_ID
        )
        if arch == "llava_next":
            kwargs["image_grid_pinpoints"] = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE]]
    elif arch == "llava_onevision":
        text["model_type"] = "qwen2"
        kwargs = dict(
            text_config=text,
            vision_config=_vision("siglip_vision_model", hidden),
            image_token_index=IMAGE_TOKEN_ID,
            video_token_index=IMAGE_TOKEN_ID - 1,
            image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
            vision_feature_layer=-1,
        )
    elif arch == "paligemma":
        text.update(model_type="gemma", head_dim=hidden // 4, tie_word_embeddings=True)  # Gemma ties (read here <4.52)
        kwargs = dict(
            text_config=text,
            vision_config=_vision("siglip_vision_model", hidden, projection_dim=hidden),
            image_token_index=IMAGE_TOKEN_ID,
            projection_dim=hidden,
            hidden_size=hidden,
            vocab_size=VOCAB,
        )
    elif arch == "idefics3":
        kwargs = dict(
            text_config=text,
            vision_config=_vision("idefics3_vision", hidden),
            image_token_id=IMAGE_TOKEN_ID,
            scale_factor=2,
        )
    else:  # qwen2_vl / qwen2_5_vl
        text.update(model_type=arch + "_text", rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        vision = dict(
            depth=2,
            embed_dim=hidden,
            hidden_size=hidden,
            num_heads=4,
            mlp_ratio=2,
            intermediate_size=2 * hidden,
            out_hidden_size=hidden,
            spatial_merge_size=2,
            patch_size=4,
            temporal_patch_size=2,
            in_chans=3,
            fullatt_block_indexes=[1],
            window_size=16,
        )
        kwargs = dict(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_TOKEN_ID,
            video_token_id=IMAGE_TOKEN_ID - 1,
            vision_start_token_id=IMAGE_TOKEN_ID - 2,
            vision_end_token_id=IMAGE_TOKEN_ID - 3,
        )
        if "text_config" not in getattr(config_cls, "sub_configs", {}):  # transformers < 4.52: one flat config
            del text["model_type"]
            kwargs.update(text)
            del kwargs["text_config"]
    kwargs.update(overrides)
    return config_cls(**kwargs)


def build_model(arch: str, num_layers: int = 8, hidden: int = 32, seed: Optional[int] = 0, **overrides: Any) -> Any:
    """A randomly initialised tiny model of ``arch`` (fp32, eval mode off)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    config = build_config(arch, num_layers, hidden, **overrides)
    model_cls = getattr(transformers, _CLASSES[arch][1])
    return model_cls(config)


def _forward_accepts(config: Any, argument: str) -> bool:
    import inspect

    for config_name, model_name in _CLASSES.values():
        if getattr(transformers, config_name, None) is type(config):
            return argument in inspect.signature(getattr(transformers, model_name).forward).parameters
    return False


def image_token_count(config: Any) -> int:
    """How many placeholder tokens one IMAGE_SIZE x IMAGE_SIZE image takes in ``config``'s model."""
    model_type = getattr(config, "model_type", "")
    if model_type.startswith("qwen2"):
        vision = config.vision_config
        side = IMAGE_SIZE // vision.patch_size // vision.spatial_merge_size
        return side * side
    if model_type == "llava" and not hasattr(config, "image_seq_length"):
        return 1  # transformers < 4.44: the model expands one placeholder per image itself
    return (IMAGE_SIZE // PATCH) ** 2


def example_inputs(config: Any, batch: int = 2, text_len: int = 8, seed: int = 0, labels: bool = True) -> dict:
    """Synthetic image+text inputs for a tiny Llava / Qwen2-VL / Llama model built by :func:`build_config`.

    Every sample is ``[bos] <image tokens> <random text>``; labels mask the image positions.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    model_type = getattr(config, "model_type", "")
    text = torch.randint(3, IMAGE_TOKEN_ID - 4, (batch, text_len), generator=generator)
    bos = torch.ones(batch, 1, dtype=torch.long)
    inputs: dict = {}
    if model_type == "llama":
        ids = torch.cat([bos, text], dim=1)
    elif model_type == "llava":
        n = image_token_count(config)
        ids = torch.cat([bos, torch.full((batch, n), IMAGE_TOKEN_ID), text], dim=1)
        inputs["pixel_values"] = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    elif model_type in ("qwen2_vl", "qwen2_5_vl"):
        vision = config.vision_config
        n = image_token_count(config)
        grid = IMAGE_SIZE // vision.patch_size
        image = torch.cat(
            [
                torch.full((batch, 1), config.vision_start_token_id),
                torch.full((batch, n), IMAGE_TOKEN_ID),
                torch.full((batch, 1), config.vision_end_token_id),
            ],
            dim=1,
        )
        ids = torch.cat([bos, image, text], dim=1)
        features = 3 * vision.temporal_patch_size * vision.patch_size**2
        inputs["pixel_values"] = torch.randn(batch * grid * grid, features, generator=generator)
        inputs["image_grid_thw"] = torch.tensor([[1, grid, grid]] * batch)
    else:
        raise NotImplementedError(f"example_inputs has no recipe for model_type {model_type!r}")
    inputs["input_ids"] = ids
    inputs["attention_mask"] = torch.ones_like(ids)
    if "pixel_values" in inputs and _forward_accepts(config, "mm_token_type_ids"):
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN_ID).long()  # transformers 5.x: M-RoPE needs it
    if labels:
        inputs["labels"] = torch.where(ids >= IMAGE_TOKEN_ID - 3, torch.full_like(ids, -100), ids)
    return inputs
