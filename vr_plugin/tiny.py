"""Tiny LVLMs built from configs, for the demo, the benchmarks and the tests.

Nothing is downloaded: configs are written here, weights are random, the
tokenizer is trained locally.  :func:`build_model` gives an in-memory model of
one of :data:`ARCHITECTURES`; :func:`save_tiny_lvlm` writes a complete model
directory (config, safetensors, tokenizer, processor, chat template) that loads
back with the ordinary ``from_pretrained`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import transformers

__all__ = [
    "ARCHITECTURES",
    "LVLM_ARCHITECTURES",
    "build_config",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "save_tiny_lvlm",
    "text_kwargs",
]

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
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration"),
    "mllama": ("MllamaConfig", "MllamaForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration"),
    "internvl": ("InternVLConfig", "InternVLForConditionalGeneration"),
    "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration"),
    "mistral3": ("Mistral3Config", "Mistral3ForConditionalGeneration"),
    "glm4v": ("Glm4vConfig", "Glm4vForConditionalGeneration"),
    "aya_vision": ("AyaVisionConfig", "AyaVisionForConditionalGeneration"),
    "llama4": ("Llama4Config", "Llama4ForConditionalGeneration"),
}
ARCHITECTURES = tuple(_CLASSES)

IMAGE_SIZE = 32
PATCH = 8
VOCAB = 512
IMAGE_TOKEN_ID = VOCAB - 1
_GRID_PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE]]  # LLaVA-NeXT any-res grid
_QWEN_PATCH = 4  # Qwen2-VL ViT patch; 2x2 patches merge into one LLM token
GEMMA3_IMAGE_TOKENS = 4  # Gemma 3 pools the 4x4 SigLIP patches 2x2
MLLAMA_TILES = 2  # Mllama: tiles per image at most
INTERNVL_IMAGE_TOKENS = 4  # InternVL: 4x4 patches, pixel-shuffled 2x2


# Families whose tiny recipes are written against transformers 5 (older releases lack or build them differently).
_NEEDS_TRANSFORMERS_5 = ("gemma3", "mllama", "qwen3_vl", "qwen3_vl_moe", "internvl", "smolvlm", "mistral3", "glm4v",
                         "aya_vision", "llama4")  # fmt: skip


def available(arch: str) -> bool:
    """Whether the installed transformers has this architecture (and builds it as the tiny recipe expects)."""
    config_name, model_name = _CLASSES[arch]
    if arch in _NEEDS_TRANSFORMERS_5 and int(transformers.__version__.split(".")[0]) < 5:
        return False
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


@dataclass
class _Tiny:
    """What a family's config function starts from."""

    config_cls: type  # the top-level config class
    text: dict  # tiny Llama text-config kwargs, the caller's ``text_overrides`` applied
    hidden: int  # the LLM's width
    text_overrides: dict  # the caller's, for families that must re-apply them over their own defaults

    @property
    def num_layers(self) -> int:
        return self.text["num_hidden_layers"]

    def text_config(self, **family: Any) -> dict:
        """``text`` with the family's entries, the caller's ``text_overrides`` still winning."""
        return {**self.text, **family, **self.text_overrides}


def build_config(
    arch: str, num_layers: int = 8, hidden: int = 32, text_overrides: Optional[dict] = None, **overrides: Any
) -> Any:
    """A tiny config of ``arch`` whose LLM has ``num_layers`` decoder layers.

    ``text_overrides`` sets entries of the LLM's config (``vocab_size``, ``pad_token_id``, ...), ``overrides``
    those of the top-level config (``image_token_id``, ...).
    """
    if arch not in _CLASSES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if not available(arch):
        raise ValueError(f"transformers {transformers.__version__} has no {_CLASSES[arch][1]}")
    config_cls = getattr(transformers, _CLASSES[arch][0])
    text_overrides = text_overrides or {}
    if arch == "llama":
        return config_cls(**{**text_kwargs(num_layers, hidden), **text_overrides}, **overrides)
    text = dict(model_type="llama", **text_kwargs(num_layers, hidden))
    text.update(text_overrides)
    kwargs = _FAMILIES[arch](_Tiny(config_cls, text, hidden, text_overrides))
    kwargs.update(overrides)
    return config_cls(**kwargs)


def _llava(tiny: _Tiny) -> dict:
    kwargs = dict(
        text_config=tiny.text,
        vision_config=_vision("clip_vision_model", tiny.hidden),
        image_token_index=IMAGE_TOKEN_ID,
    )
    if _accepts_init(tiny.config_cls, "image_seq_length"):  # transformers < 4.52 treats fewer tokens as legacy input
        kwargs["image_seq_length"] = (IMAGE_SIZE // PATCH) ** 2
    return kwargs


def _llava_next(tiny: _Tiny) -> dict:
    return dict(
        text_config=tiny.text,
        vision_config=_vision("clip_vision_model", tiny.hidden),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=_GRID_PINPOINTS,
    )


def _llava_onevision(tiny: _Tiny) -> dict:
    tiny.text["model_type"] = "qwen2"
    return dict(
        text_config=tiny.text,
        vision_config=_vision("siglip_vision_model", tiny.hidden),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=IMAGE_TOKEN_ID - 1,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
        vision_feature_layer=-1,
    )


def _paligemma(tiny: _Tiny) -> dict:
    hidden = tiny.hidden
    tiny.text.update(model_type="gemma", head_dim=hidden // 4, tie_word_embeddings=True)  # Gemma ties (read <4.52)
    return dict(
        text_config=tiny.text,
        vision_config=_vision("siglip_vision_model", hidden, projection_dim=hidden),
        image_token_index=IMAGE_TOKEN_ID,
        projection_dim=hidden,
        hidden_size=hidden,
        vocab_size=tiny.text["vocab_size"],
    )


def _idefics3(tiny: _Tiny) -> dict:
    return dict(
        text_config=tiny.text,
        vision_config=_vision("idefics3_vision", tiny.hidden),
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
    )


def _mrope_section(hidden: int, heads: int) -> list:
    half = hidden // heads // 2  # rotary frequencies per head, split over (t, h, w)
    return [half // 4, half // 4, half - 2 * (half // 4)]


def _qwen2_vl(tiny: _Tiny) -> dict:
    """Qwen2-VL and Qwen2.5-VL."""
    text, hidden = tiny.text, tiny.hidden
    section = _mrope_section(hidden, text["num_attention_heads"])
    text.update(
        model_type=tiny.config_cls.model_type + "_text", rope_scaling={"type": "mrope", "mrope_section": section}
    )
    vision = dict(
        depth=2,
        embed_dim=hidden,
        hidden_size=hidden,
        num_heads=4,
        mlp_ratio=2,
        intermediate_size=2 * hidden,
        out_hidden_size=hidden,
        spatial_merge_size=2,
        patch_size=_QWEN_PATCH,
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
    if "text_config" not in getattr(tiny.config_cls, "sub_configs", {}):  # transformers < 4.52: one flat config
        del text["model_type"]
        kwargs.update(text)
        del kwargs["text_config"]
    return kwargs


# ---------------------------------------------------------------------------------------------- newer families


def _cross_attention_layers(num_layers: int) -> list:
    """Mllama's cross-attention layers: every third from layer 3 (Llama 3.2 Vision: every fifth), [3, 6] of 8."""
    return list(range(3, num_layers, 3)) or [num_layers - 1]


def _gemma3(tiny: _Tiny) -> dict:
    """Gemma 3: SigLIP (4x4 patches) average-pooled 2x2 into 4 soft tokens, Gemma 3 LLM with sliding layers."""
    head = tiny.hidden // 4
    text = tiny.text_config(
        model_type="gemma3_text", head_dim=head, query_pre_attn_scalar=head, sliding_window=16, tie_word_embeddings=True
    )
    return dict(
        text_config=text,
        vision_config=_vision("siglip_vision_model", tiny.hidden),
        mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
        image_token_index=IMAGE_TOKEN_ID,
        boi_token_index=IMAGE_TOKEN_ID - 1,
        eoi_token_index=IMAGE_TOKEN_ID - 2,
    )


def _mllama(tiny: _Tiny) -> dict:
    """Llama 3.2 Vision: tiled ViT (up to 2 tiles, 2 local + 1 global layer) read by cross-attention layers."""
    hidden, layers = tiny.hidden, [0, 1]  # vision hidden states concatenated to the last one
    text = tiny.text_config(
        model_type="mllama_text_model", cross_attention_layers=_cross_attention_layers(tiny.num_layers)
    )
    vision = dict(
        model_type="mllama_vision_model",
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        max_num_tiles=MLLAMA_TILES,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],  # all layouts of <= 2 tiles, as the image processor makes
        intermediate_layers_indices=layers,
        vision_output_dim=hidden * (len(layers) + 1),
    )
    return dict(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID)


def _qwen3_vl(tiny: _Tiny) -> dict:
    """Qwen3-VL (and its MoE): Qwen2-VL-like ViT whose blocks 0 and 1 also feed LLM layers 0 and 1 (deepstack)."""
    hidden, heads = tiny.hidden, tiny.text["num_attention_heads"]
    model_type = tiny.config_cls.model_type
    rope = dict(
        rope_type="default", rope_theta=5_000_000.0, mrope_section=_mrope_section(hidden, heads), mrope_interleaved=True
    )
    text = dict(model_type=model_type + "_text", head_dim=hidden // heads, rope_parameters=rope)
    if model_type == "qwen3_vl_moe":
        text.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden,
            decoder_sparse_step=1,
            mlp_only_layers=[tiny.num_layers // 2],  # one dense-MLP layer: [4] of 8
        )
    vision = dict(
        model_type=model_type + "_vision",
        depth=2,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_heads=4,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=hidden,
        num_position_embeddings=(IMAGE_SIZE // _QWEN_PATCH) ** 2,
        deepstack_visual_indexes=[0, 1],
    )
    return dict(text_config=tiny.text_config(**text), vision_config=vision, **_qwen_token_ids())


def _qwen_token_ids() -> dict:
    return dict(
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=IMAGE_TOKEN_ID - 1,
        vision_start_token_id=IMAGE_TOKEN_ID - 2,
        vision_end_token_id=IMAGE_TOKEN_ID - 3,
    )


def _internvl(tiny: _Tiny) -> dict:
    """InternVL 3: InternViT (CLS dropped), 2x2 pixel shuffle into a 2-layer MLP, Qwen2 LLM."""
    vision = _vision("internvl_vision", tiny.hidden, image_size=[IMAGE_SIZE] * 2, patch_size=[PATCH] * 2)
    return dict(
        text_config=tiny.text_config(model_type="qwen2"),
        vision_config=vision,
        tie_word_embeddings=False,  # InternVL3-8B: Qwen2.5-7B does not tie
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=INTERNVL_IMAGE_TOKENS,
        downsample_ratio=0.5,
    )


def _smolvlm(tiny: _Tiny) -> dict:
    """SmolVLM: Idefics3's layout (SigLIP, pixel-shuffle connector, Llama LLM)."""
    return dict(
        text_config=tiny.text_config(model_type="llama"),
        vision_config=_vision("smolvlm_vision", tiny.hidden),
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
    )


def _mistral3(tiny: _Tiny) -> dict:
    """Mistral Small 3.1: Pixtral ViT, 2x2 patch merger, Mistral LLM."""
    return dict(
        text_config=tiny.text_config(model_type="mistral", sliding_window=None),
        vision_config=_vision("pixtral", tiny.hidden),
        image_token_index=IMAGE_TOKEN_ID,
        spatial_merge_size=2,
        tie_word_embeddings=False,  # Mistral LLMs do not tie
    )


def _glm4v(tiny: _Tiny) -> dict:
    """GLM-4.1V: Qwen2-VL-like ViT with learnt (interpolated) positions, GLM-4 LLM with half-rotary M-RoPE."""
    hidden, heads = tiny.hidden, tiny.text["num_attention_heads"]
    rope = dict(rope_type="default", rope_theta=10_000.0, partial_rotary_factor=0.5)
    rope["mrope_section"] = _mrope_section(hidden // 2, heads)
    vision = dict(
        model_type="glm4v_vision",
        depth=2,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=hidden,
    )
    return dict(
        text_config=tiny.text_config(model_type="glm4v_text", rope_parameters=rope),
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=IMAGE_TOKEN_ID - 1,
        image_start_token_id=IMAGE_TOKEN_ID - 2,
        image_end_token_id=IMAGE_TOKEN_ID - 3,
        video_start_token_id=IMAGE_TOKEN_ID - 4,
        video_end_token_id=IMAGE_TOKEN_ID - 5,
    )


def _aya_vision(tiny: _Tiny) -> dict:
    """Aya Vision: SigLIP, 2x2 pixel shuffle into a SwiGLU projector, Cohere2 LLM (sliding + full layers)."""
    text = tiny.text_config(model_type="cohere2", sliding_window=16, tie_word_embeddings=True)
    return dict(
        text_config=text,
        vision_config=_vision("siglip_vision_model", tiny.hidden),
        image_token_index=IMAGE_TOKEN_ID,
        downsample_factor=2,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )


def _llama4(tiny: _Tiny) -> dict:
    """Llama 4: ViT with 2x2 pixel shuffle, MoE LLM (every 2nd layer 4 experts, every 4th layer without RoPE)."""
    hidden = tiny.hidden
    text = tiny.text_config(
        model_type="llama4_text",
        head_dim=hidden // 4,
        intermediate_size=hidden,  # per expert
        intermediate_size_mlp=2 * hidden,  # dense layers
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=4,
        attention_chunk_size=16,
    )
    vision = _vision(
        "llama4_vision_model",
        hidden,
        intermediate_size=4 * hidden,  # also the pixel-shuffled width the projector MLP reads
        vision_output_dim=hidden,
        pixel_shuffle_ratio=0.5,
        projector_input_dim=hidden,
        projector_output_dim=hidden,
    )
    return dict(
        text_config=text,
        vision_config=vision,
        image_token_index=IMAGE_TOKEN_ID,
        boi_token_index=IMAGE_TOKEN_ID - 1,
        eoi_token_index=IMAGE_TOKEN_ID - 2,
    )


_FAMILIES: dict[str, Callable[[_Tiny], dict]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "paligemma": _paligemma,
    "idefics3": _idefics3,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_vl,
    "gemma3": _gemma3,
    "mllama": _mllama,
    "qwen3_vl": _qwen3_vl,
    "qwen3_vl_moe": _qwen3_vl,
    "internvl": _internvl,
    "smolvlm": _smolvlm,
    "mistral3": _mistral3,
    "glm4v": _glm4v,
    "aya_vision": _aya_vision,
    "llama4": _llama4,
}


def build_model(arch: str, num_layers: int = 8, hidden: int = 32, seed: Optional[int] = 0, **overrides: Any) -> Any:
    """A randomly initialised tiny model of ``arch`` (fp32, eval mode off)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    config = build_config(arch, num_layers, hidden, **overrides)
    model_cls = getattr(transformers, _CLASSES[arch][1])
    model = model_cls(config)
    if arch in _LIVE_IMAGE_PATH:
        _LIVE_IMAGE_PATH[arch](model)
    return model


def _gemma3_projection(model: Any) -> None:
    """Gemma 3 initialises its image projection to zeros: the image would reach the LLM as zeros."""
    import torch

    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.normal_(std=model.config.text_config.initializer_range)


def _mllama_gates(model: Any) -> None:
    """Mllama initialises its cross-attention gates to zeros (tanh(0) = 0): the LLM would not see the image."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(0.5)


# families whose initialisation leaves the image path dead, and the fix (as a trained checkpoint has it)
_LIVE_IMAGE_PATH: dict[str, Callable[[Any], None]] = {"gemma3": _gemma3_projection, "mllama": _mllama_gates}


def _forward_accepts(config: Any, argument: str) -> bool:
    import inspect

    for config_name, model_name in _CLASSES.values():
        if getattr(transformers, config_name, None) is type(config):
            return argument in inspect.signature(getattr(transformers, model_name).forward).parameters
    return False


def _accepts_init(cls: type, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(cls.__init__).parameters


def image_token_count(config: Any) -> int:
    """How many placeholder tokens one IMAGE_SIZE x IMAGE_SIZE image takes in ``config``'s model."""
    model_type = getattr(config, "model_type", "")
    if model_type.startswith(("qwen2", "qwen3_vl", "glm4v")):
        vision = config.vision_config
        side = IMAGE_SIZE // vision.patch_size // vision.spatial_merge_size
        return side * side
    if model_type == "llava" and not _accepts_init(type(config), "image_seq_length"):
        return 1  # transformers < 4.44: the model expands one placeholder per image itself
    if model_type in _IMAGE_TOKENS:
        return _IMAGE_TOKENS[model_type](config)
    return (IMAGE_SIZE // PATCH) ** 2


def _merged_tokens(merge: int) -> int:
    """ViT patches of one image, merged ``merge`` x ``merge`` (pixel shuffle / patch merger)."""
    return (IMAGE_SIZE // PATCH // merge) ** 2


_IMAGE_TOKENS: dict[str, Callable[[Any], int]] = {
    "gemma3": lambda config: config.mm_tokens_per_image,
    "mllama": lambda config: 1,  # one <|image|> token; the LLM reads the image through cross-attention
    "internvl": lambda config: config.image_seq_length,
    "smolvlm": lambda config: _merged_tokens(config.scale_factor),
    "mistral3": lambda config: _merged_tokens(config.spatial_merge_size),
    "aya_vision": lambda config: _merged_tokens(config.downsample_factor),
    "llama4": lambda config: _merged_tokens(round(1 / config.vision_config.pixel_shuffle_ratio)),
}


def _pixels(batch: int, generator: Any, *leading: int) -> Any:
    import torch

    return torch.randn(batch, *leading, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def _run(batch: int, *tokens: tuple) -> Any:
    """A (batch, n) tensor of ``(token id, count)`` runs."""
    import torch

    return torch.cat([torch.full((batch, count), token) for token, count in tokens], dim=1)


def _plain_image(config: Any, batch: int, generator: Any) -> tuple:
    """Llava & co: the placeholders alone, one (3, H, W) image per sample."""
    return _run(batch, (IMAGE_TOKEN_ID, image_token_count(config))), {"pixel_values": _pixels(batch, generator)}


def _wrapped_image(config: Any, batch: int, generator: Any) -> tuple:
    """Gemma 3 / Llama 4: begin-of-image, the placeholders, end-of-image."""
    tokens = ((config.boi_token_index, 1), (IMAGE_TOKEN_ID, image_token_count(config)), (config.eoi_token_index, 1))
    return _run(batch, *tokens), {"pixel_values": _pixels(batch, generator)}


def _qwen_image(config: Any, batch: int, generator: Any) -> tuple:
    """Qwen2-VL & co: vision start/end around the merged patches; flattened patches and their (t, h, w) grid."""
    import torch

    vision = config.vision_config
    grid = IMAGE_SIZE // vision.patch_size
    start = getattr(config, "vision_start_token_id", None) or config.image_start_token_id  # GLM-4.1V's names
    end = getattr(config, "vision_end_token_id", None) or config.image_end_token_id
    block = _run(batch, (start, 1), (IMAGE_TOKEN_ID, image_token_count(config)), (end, 1))
    features = 3 * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(batch * grid * grid, features, generator=generator)
    return block, {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, grid, grid]] * batch)}


def _mistral3_image(config: Any, batch: int, generator: Any) -> tuple:
    """Mistral 3: Pixtral wants each image's size."""
    import torch

    block, inputs = _plain_image(config, batch, generator)
    inputs["image_sizes"] = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * batch)
    return block, inputs


def _any_res_image(config: Any, batch: int, generator: Any) -> tuple:
    """LLaVA-NeXT / OneVision: a square image is its base view plus one grid tile (16 + 16 tokens) and a newline per
    grid row (4): 36 placeholders; pixel values (batch, 2 views, 3, H, W) with each image's size."""
    import torch

    inputs = {"pixel_values": _pixels(batch, generator, 2), "image_sizes": torch.tensor([[IMAGE_SIZE] * 2] * batch)}
    side = IMAGE_SIZE // PATCH
    return _run(batch, (IMAGE_TOKEN_ID, 2 * side * side + side)), inputs


def _idefics3_image(config: Any, batch: int, generator: Any) -> tuple:
    """Idefics3 / SmolVLM: pixel values with an image dimension, (batch, images, 3, H, W)."""
    tokens = _merged_tokens(config.scale_factor)
    return _run(batch, (IMAGE_TOKEN_ID, tokens)), {"pixel_values": _pixels(batch, generator, 1)}


def _mllama_image(config: Any, batch: int, generator: Any) -> tuple:
    """Mllama: one <|image|> token; one image of one 1x1 tile (the second tile slot padding), aspect ratio id 1."""
    import torch

    tiles = config.vision_config.max_num_tiles
    pixels = _pixels(batch, generator, 1, tiles)
    pixels[:, :, 1:] = 0
    mask = torch.zeros(batch, 1, tiles, dtype=torch.long)
    mask[:, :, 0] = 1
    inputs = {"pixel_values": pixels, "aspect_ratio_ids": torch.ones(batch, 1, dtype=torch.long)}
    inputs["aspect_ratio_mask"] = mask
    return _run(batch, (IMAGE_TOKEN_ID, 1)), inputs


_IMAGE_INPUTS: dict[str, Callable[[Any, int, Any], tuple]] = {
    "llava": _plain_image,
    "llava_next": _any_res_image,
    "llava_onevision": _any_res_image,
    "idefics3": _idefics3_image,
    "paligemma": _plain_image,
    "qwen2_vl": _qwen_image,
    "qwen2_5_vl": _qwen_image,
    "gemma3": _wrapped_image,
    "mllama": _mllama_image,
    "qwen3_vl": _qwen_image,
    "qwen3_vl_moe": _qwen_image,
    "internvl": _plain_image,
    "smolvlm": _idefics3_image,
    "mistral3": _mistral3_image,
    "glm4v": _qwen_image,
    "aya_vision": _plain_image,
    "llama4": _wrapped_image,
}


def example_inputs(config: Any, batch: int = 2, text_len: int = 8, seed: int = 0, labels: bool = True) -> dict:
    """Synthetic image+text inputs for a tiny model built by :func:`build_config` (Llama: text only).

    Every sample is ``[bos] <image tokens> <random text>``, the image tokens as the family's processor writes them
    (placeholders, wrapped in begin/end tokens where the family has them); labels mask the image tokens.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    model_type = getattr(config, "model_type", "")
    if model_type != "llama" and model_type not in _IMAGE_INPUTS:
        raise NotImplementedError(f"example_inputs has no recipe for model_type {model_type!r}")
    text = torch.randint(3, IMAGE_TOKEN_ID - 4, (batch, text_len), generator=generator)
    bos = torch.ones(batch, 1, dtype=torch.long)
    block, inputs = torch.zeros(batch, 0, dtype=torch.long), {}
    if model_type != "llama":
        block, inputs = _IMAGE_INPUTS[model_type](config, batch, generator)
    ids = torch.cat([bos, block, text], dim=1)
    image = torch.zeros_like(ids, dtype=torch.bool)
    image[:, 1 : 1 + block.shape[1]] = True
    inputs["input_ids"] = ids
    inputs["attention_mask"] = torch.ones_like(ids)
    if "pixel_values" in inputs and _forward_accepts(config, "mm_token_type_ids"):
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN_ID).long()  # transformers 5.x: M-RoPE needs it
    if model_type == "gemma3":  # bidirectional attention within an image, as Gemma3Processor marks it
        inputs["token_type_ids"] = (ids == IMAGE_TOKEN_ID).long()
    if model_type == "mllama":  # every token from the <|image|> on reads the image's first tile
        cross = torch.zeros(batch, ids.shape[1], 1, config.vision_config.max_num_tiles, dtype=torch.long)
        cross[:, 1:, :, 0] = 1
        inputs["cross_attention_mask"] = cross
    if labels:
        inputs["labels"] = torch.where(image, torch.full_like(ids, -100), ids)
    return inputs


# --------------------------------------------------------------------------------------------------------------
# Complete local model directories: model + locally trained tokenizer + processor + chat template.

LVLM_ARCHITECTURES = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "gemma3",
    "mllama",
    "qwen3_vl",
    "qwen3_vl_moe",
    "internvl",
    "glm4v",
    "aya_vision",
)

# LLaVA-1.5's Vicuna-v1 conversation ("USER: <image>\nQ ASSISTANT: A</s>USER: ..."), as llava-hf/llava-1.5 renders
# it, plus the </s> LLaVA trains on after each answer.  Content parts are rendered in order, so an image sits
# where the user put it.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string"
    " else message['content'] -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- for part in parts -%}{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Mistral-instruct style, as llava-hf/llava-v1.6-mistral-7b-hf ("[INST] <image>\nQ [/INST] A</s>"); the prompt
# already ends with "[/INST]", so there is no generation prompt.
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string"
    " else message['content'] -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST] ' }}"
    "{%- for part in parts -%}{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{{ ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' }}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Qwen2-VL-Instruct's template (ChatML with vision tokens and a default system prompt), as the checkpoint ships it.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

# A message's content as a list of parts (a string is one text part).
_PARTS = (
    "{%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string"
    " else message['content'] -%}"
)

# Gemma 3 (google/gemma-3-4b-it): a system turn goes into the first user turn; the assistant is "model"; an image
# is <start_of_image>, which Gemma3Processor expands to "\n\n<start_of_image><image_soft_token>...<end_of_image>\n\n".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first = (messages[0]['content'] if messages[0]['content'] is string"
    " else messages[0]['content'][0]['text']) + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}" + _PARTS + "{{ '<start_of_turn>' + ('model' if message['role'] == "
    "'assistant' else message['role']) + '\\n' + (first if loop.first else '') }}"
    "{%- for part in parts -%}{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Llama 3.2 Vision Instruct, without its tool and date preamble: one <|image|> per image, turns end with <|eot_id|>.
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}" + _PARTS + "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
    "\\n\\n' }}"
    "{%- for part in parts -%}{%- if part['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)


def _chatml(image: str, video: str) -> str:
    """ChatML without a default system prompt (Qwen3-VL, InternVL 3), ``image`` / ``video`` for each such part."""
    return (
        "{%- for message in messages -%}" + _PARTS + "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- for part in parts -%}{%- if part['type'] == 'image' -%}{{ '" + image + "' }}"
        "{%- elif part['type'] == 'video' -%}{{ '" + video + "' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


# Qwen3-VL-Instruct: ChatML, no default system prompt (unlike Qwen2-VL).
QWEN3_VL_CHAT_TEMPLATE = _chatml(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
)
# InternVL3-hf: ChatML; InternVLProcessor expands each <IMG_CONTEXT> to "<img><IMG_CONTEXT>...</img>".
INTERNVL_CHAT_TEMPLATE = _chatml("<IMG_CONTEXT>\\n", "<video>\\n")

# GLM-4.1V without thinking: "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>Q<|assistant|>\nA";
# an answer ends where the next role token starts (the real generation config stops on <|user|>).
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages -%}" + _PARTS + "{{ '<|' + message['role'] + '|>\\n' }}"
    "{%- for part in parts -%}{%- if part['type'] == 'image' -%}{{ '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<|begin_of_video|><|video|><|end_of_video|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

# Aya Vision (Command R7B turns, no default preamble); AyaVisionProcessor expands each <image> to
# "<|START_OF_IMG|>TILE_GLOBAL<|IMG_PATCH|>...<|END_OF_IMG|>".
AYA_VISION_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}" + _PARTS + "{{ '<|START_OF_TURN_TOKEN|>' + {'system': '<|SYSTEM_TOKEN|>', "
    "'user': '<|USER_TOKEN|>', 'assistant': '<|CHATBOT_TOKEN|>'}[message['role']] }}"
    "{%- for part in parts -%}{%- if part['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}"
    "{{ '<|END_OF_TURN_TOKEN|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{%- endif -%}"
)

# Text the templates write, so that the tokenizer learns it as words rather than bytes.
_TEMPLATE_TEXT = [
    "USER: ASSISTANT: USER: ASSISTANT:",
    "[INST] [/INST] [INST] [/INST]",
    "system\nYou are a helpful assistant.\nuser\nassistant\n",
    "Picture 1: Video 1:",
]
# Llama 3's pre-tokenizer regex (tiktoken cl100k style): newlines are their own pieces
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN_TOKENS = dict(
    image_token_id="<|image_pad|>",
    video_token_id="<|video_pad|>",
    vision_start_token_id="<|vision_start|>",
    vision_end_token_id="<|vision_end|>",
)


def _recipe(arch: str) -> dict:
    """Special tokens, chat template and token roles of ``arch``'s tokenizer.

    ``specials`` come first (ids 0, 1, ...), ``added`` after the trained vocabulary; ``roles`` and ``extra`` name
    tokens for the tokenizer, ``tokens`` for the model config (config field -> token).  Optional: ``text`` (more
    text for the tokenizer to learn), ``add_bos`` (False: has a bos token but does not prepend it), ``video`` (the
    video processor config a directory saved without one records).
    """
    if arch in _RECIPES:
        return _RECIPES[arch]()
    raise ValueError(f"no tiny tokenizer/processor recipe for {arch!r}; choose from {', '.join(LVLM_ARCHITECTURES)}")


def _llava_recipe(arch: str) -> dict:
    return dict(
        specials=["<pad>", "<s>", "</s>"],  # ids 0, 1, 2 as in text_kwargs
        added=["<image>"],
        roles=dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>"),
        extra=dict(image_token="<image>"),
        template=LLAVA_CHAT_TEMPLATE if arch == "llava" else LLAVA_NEXT_CHAT_TEMPLATE,
        tokens=dict(image_token_index="<image>"),
    )


def _qwen_recipe(template: str, video_processor: str) -> dict:
    return dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        roles=dict(pad_token="<|endoftext|>", eos_token="<|im_end|>"),  # Qwen adds no bos
        extra=dict(image_token="<|image_pad|>", video_token="<|video_pad|>"),
        template=template,
        tokens=_QWEN_TOKENS,
        video=dict(video_processor_type=video_processor, **_qwen_video_config()),
    )


def _gemma3_recipe() -> dict:
    return dict(
        specials=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],  # Gemma's ids 0, 1, 2
        added=["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        roles=dict(pad_token="<pad>", bos_token="<bos>", eos_token="<end_of_turn>"),
        extra=dict(image_token="<image_soft_token>", boi_token="<start_of_image>", eoi_token="<end_of_image>"),
        template=GEMMA3_CHAT_TEMPLATE,
        tokens=dict(
            image_token_index="<image_soft_token>", boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>"
        ),
        text=["user\nmodel\nuser\nmodel\n"],
    )


def _mllama_recipe() -> dict:
    return dict(
        specials=["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"]
        + ["<|start_header_id|>", "<|end_header_id|>"],
        added=["<|image|>", "<|python_tag|>"],
        roles=dict(pad_token="<|finetune_right_pad_id|>", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        extra=dict(image_token="<|image|>"),
        template=MLLAMA_CHAT_TEMPLATE,
        tokens=dict(image_token_index="<|image|>"),
        text=["system\n\nuser\n\nassistant\n\n"],
        split=_LLAMA3_SPLIT,  # keeps "\n\n" one piece before a word, as the header's "\n\n" ends a prompt
    )


def _internvl_recipe() -> dict:
    return dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        roles=dict(pad_token="<|endoftext|>", eos_token="<|im_end|>"),
        extra=dict(
            start_image_token="<img>",
            end_image_token="</img>",
            context_image_token="<IMG_CONTEXT>",
            video_token="<video>",
        ),
        template=INTERNVL_CHAT_TEMPLATE,
        tokens=dict(image_token_id="<IMG_CONTEXT>"),
        video=dict(video_processor_type="InternVLVideoProcessor", size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
    )


def _glm4v_recipe() -> dict:
    return dict(
        specials=["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
        added=["<|begin_of_image|>", "<|end_of_image|>", "<|image|>"]
        + ["<|begin_of_video|>", "<|end_of_video|>", "<|video|>"],
        roles=dict(pad_token="<|endoftext|>", eos_token="<|endoftext|>"),  # no bos: the template writes [gMASK]<sop>
        extra=dict(image_token="<|image|>", video_token="<|video|>"),
        template=GLM4V_CHAT_TEMPLATE,
        tokens=dict(
            image_token_id="<|image|>",
            video_token_id="<|video|>",
            image_start_token_id="<|begin_of_image|>",
            image_end_token_id="<|end_of_image|>",
            video_start_token_id="<|begin_of_video|>",
            video_end_token_id="<|end_of_video|>",
        ),
        video=dict(video_processor_type="Glm4vVideoProcessor", **_glm4v_pixels()),
    )


def _aya_vision_recipe() -> dict:
    return dict(
        specials=["<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>"]
        + ["<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"],
        added=["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>"],
        roles=dict(pad_token="<PAD>", bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>"),
        extra={},
        template=AYA_VISION_CHAT_TEMPLATE,
        tokens=dict(image_token_index="<|IMG_PATCH|>"),
        text=["TILE_GLOBAL TILE_GLOBAL"],
    )


_RECIPES: dict[str, Callable[[], dict]] = {
    "llava": lambda: _llava_recipe("llava"),
    "llava_next": lambda: _llava_recipe("llava_next"),
    "qwen2_vl": lambda: _qwen_recipe(QWEN2_VL_CHAT_TEMPLATE, "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": lambda: _qwen_recipe(QWEN2_VL_CHAT_TEMPLATE, "Qwen2VLVideoProcessor"),
    "gemma3": _gemma3_recipe,
    "mllama": _mllama_recipe,
    "qwen3_vl": lambda: _qwen_recipe(QWEN3_VL_CHAT_TEMPLATE, "Qwen3VLVideoProcessor"),
    "qwen3_vl_moe": lambda: _qwen_recipe(QWEN3_VL_CHAT_TEMPLATE, "Qwen3VLVideoProcessor"),
    "internvl": _internvl_recipe,
    "glm4v": _glm4v_recipe,
    "aya_vision": _aya_vision_recipe,
}


def build_tokenizer(arch: str) -> Any:
    """A byte-level BPE tokenizer trained (deterministically) on :func:`synthetic.corpus` for ``arch``.

    Special tokens come first (pad/bos/eos or Qwen's ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``), the
    image tokens last; Llava-family tokenizers prepend ``<s>``, Qwen's add nothing, as the real checkpoints do.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from .synthetic import corpus

    recipe = _recipe(arch)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if "split" in recipe:  # the checkpoint's own split regex, then bytes
        split = pre_tokenizers.Split(Regex(recipe["split"]), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,  # an upper bound: the corpus runs out of merges well before
        special_tokens=recipe["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus() + _TEMPLATE_TEXT + recipe.get("text", []), trainer)
    backend.add_special_tokens(recipe["added"])
    bos = recipe["roles"].get("bos_token")
    if bos is not None and recipe.get("add_bos", True):
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=recipe["template"],
        model_max_length=text_kwargs()["max_position_embeddings"],
        model_input_names=["input_ids", "attention_mask"],
        extra_special_tokens=recipe["extra"],
        **recipe["roles"],
    )


def build_processor(arch: str, tokenizer: Any) -> Any:
    """The processor of ``arch`` around ``tokenizer``, sized so it inserts as many image tokens as the model uses.

    Llava: CLIP at IMAGE_SIZE, ``patch_size=PATCH``, CLS counted then dropped (``"default"`` feature select):
    (32/8)^2 = 16 tokens.  LLaVA-NeXT: the same 16 base tokens plus the unpadded any-res grid and one newline per
    row, 16 + 16 + 4 = 36 for a square image (16 + 32 + 4 = 52 for a 1:2 one).  Qwen2-VL: images resized to
    IMAGE_SIZE^2 pixels (aspect kept, sides multiples of 8), patch 4, 2x2 merge: (32/4/2)^2 = 16 tokens.
    Qwen3-VL and GLM-4.1V alike (16).  Gemma 3: 4 soft tokens.  Mllama: one <|image|>, up to 2 tiles.  InternVL,
    Aya Vision: one 32x32 tile, 4 tokens (plus begin/end tokens).  (SmolVLM and Mistral 3 have none: their
    processors need torchvision, SmolVLM's also num2words.)
    """
    if arch not in _PROCESSORS:
        raise ValueError(f"no tiny processor for {arch!r}; choose from {', '.join(LVLM_ARCHITECTURES)}")
    return _PROCESSORS[arch](arch, tokenizer, _recipe(arch)["template"])


def _llava_processor(arch: str, tokenizer: Any, template: str) -> Any:
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if arch == "llava":
        images = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop)
        cls = transformers.LlavaProcessor
    else:
        images = transformers.LlavaNextImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size=crop, image_grid_pinpoints=_GRID_PINPOINTS
        )
        cls = transformers.LlavaNextProcessor
    return cls(
        images,
        tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )


def _with_video(name: str, arch: str, images: Any, tokenizer: Any, template: str, **kwargs: Any) -> Any:
    """Processor ``name`` with the video processor of ``arch``'s recipe, or without one where that needs
    torchvision (transformers >= 5 builds Qwen2-VL-style video processors on torchvision only)."""
    from .data import image_only_processor_class

    cls = getattr(transformers, name)
    config = dict(_recipe(arch)["video"])
    video_cls = getattr(transformers, config.pop("video_processor_type"))
    try:
        return cls(images, tokenizer, video_cls(**config), chat_template=template, **kwargs)
    except ImportError:
        return image_only_processor_class(cls)(images, tokenizer, chat_template=template, **kwargs)


def _qwen_processor(arch: str, tokenizer: Any, template: str) -> Any:
    pixels = IMAGE_SIZE * IMAGE_SIZE
    kwargs = dict(min_pixels=pixels, max_pixels=pixels, patch_size=_QWEN_PATCH, temporal_patch_size=2, merge_size=2)
    if arch.startswith("qwen3_vl"):  # Qwen3-VL normalises to [-1, 1]
        kwargs.update(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images = transformers.Qwen2VLImageProcessor(**kwargs)
    name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(arch, "Qwen3VLProcessor")
    return _with_video(name, arch, images, tokenizer, template)


def _gemma3_processor(arch: str, tokenizer: Any, template: str) -> Any:
    images = transformers.Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False)
    return transformers.Gemma3Processor(images, tokenizer, chat_template=template, image_seq_length=GEMMA3_IMAGE_TOKENS)


def _mllama_processor(arch: str, tokenizer: Any, template: str) -> Any:
    images = transformers.MllamaImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=MLLAMA_TILES
    )
    return transformers.MllamaProcessor(images, tokenizer, chat_template=template)


def _one_tile() -> Any:
    """InternVL / Aya Vision's image processor (GOT-OCR2's) on one IMAGE_SIZE tile, no crops."""
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return transformers.GotOcr2ImageProcessor(size=size, crop_to_patches=False, min_patches=1, max_patches=1)


def _internvl_processor(arch: str, tokenizer: Any, template: str) -> Any:
    return _with_video(
        "InternVLProcessor", arch, _one_tile(), tokenizer, template, image_seq_length=INTERNVL_IMAGE_TOKENS
    )


def _glm4v_pixels() -> dict:
    pixels = 2 * IMAGE_SIZE * IMAGE_SIZE  # GLM counts the two temporal copies of an image
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    return dict(size=size, patch_size=_QWEN_PATCH, temporal_patch_size=2, merge_size=2)


def _glm4v_processor(arch: str, tokenizer: Any, template: str) -> Any:
    images = transformers.Glm4vImageProcessor(**_glm4v_pixels())
    return _with_video("Glm4vProcessor", arch, images, tokenizer, template)


def _aya_vision_processor(arch: str, tokenizer: Any, template: str) -> Any:
    return transformers.AyaVisionProcessor(
        _one_tile(), tokenizer, patch_size=PATCH, img_size=IMAGE_SIZE, downsample_factor=2, chat_template=template
    )


_PROCESSORS: dict[str, Callable[[str, Any, str], Any]] = {
    "llava": _llava_processor,
    "llava_next": _llava_processor,
    "qwen2_vl": _qwen_processor,
    "qwen2_5_vl": _qwen_processor,
    "gemma3": _gemma3_processor,
    "mllama": _mllama_processor,
    "qwen3_vl": _qwen_processor,
    "qwen3_vl_moe": _qwen_processor,
    "internvl": _internvl_processor,
    "glm4v": _glm4v_processor,
    "aya_vision": _aya_vision_processor,
}


def _qwen_video_config() -> dict:
    pixels = IMAGE_SIZE * IMAGE_SIZE
    return dict(min_pixels=pixels, max_pixels=pixels, patch_size=_QWEN_PATCH, temporal_patch_size=2, merge_size=2)


def save_tiny_lvlm(arch: str, out_dir: str, num_layers: int = 8, hidden: int = 64, seed: int = 0) -> str:
    """Write a complete tiny HF-native LVLM of ``arch`` (one of :data:`LVLM_ARCHITECTURES`) into ``out_dir``.

    The directory holds the model (random weights, ``num_layers`` LLM layers of width ``hidden``), its generation
    config, a locally trained tokenizer, the processor and the chat template, and loads back with
    ``AutoProcessor.from_pretrained`` / ``AutoModelForImageTextToText.from_pretrained``.  (The processors of the
    families with video (Qwen2/3-VL, InternVL, GLM-4.1V) need torchvision for their video processor in transformers
    >= 5; :func:`vr_plugin.data.load_processor` loads the directory without it.)  Returns ``out_dir``.
    """
    import json
    import os

    if arch not in LVLM_ARCHITECTURES:
        raise ValueError(f"save_tiny_lvlm has no recipe for {arch!r}; choose from {', '.join(LVLM_ARCHITECTURES)}")
    recipe = _recipe(arch)
    tokenizer = build_tokenizer(arch)
    processor = build_processor(arch, tokenizer)
    qwen = arch.startswith("qwen")
    bos = tokenizer.pad_token_id if qwen else tokenizer.bos_token_id  # Qwen2-VL's config names <|endoftext|> as bos
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    text = dict(vocab_size=len(tokenizer), pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    tokens = {field: tokenizer.convert_tokens_to_ids(token) for field, token in recipe["tokens"].items()}
    model = build_model(arch, num_layers, hidden, seed, text_overrides=text, **tokens)
    model.generation_config = transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    if "video" in recipe and getattr(processor, "video_processor", None) is None:  # made without torchvision
        path = os.path.join(out_dir, "processor_config.json")
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["video_processor"] = recipe["video"]  # what AutoProcessor needs where torchvision is installed
        config.update({k: v for k, v in _own_init_args(processor).items() if k not in config})
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
    return out_dir


def _own_init_args(processor: Any) -> dict:
    """The processor class's own ``__init__`` arguments (InternVL's ``image_seq_length``), which ``save_pretrained``
    of an image-only subclass (whose ``__init__`` does not name them) leaves out."""
    import inspect

    cls = type(processor).__mro__[1] if type(processor).__qualname__.startswith("_ImageOnly") else type(processor)
    skip = {"self", "image_processor", "tokenizer", "video_processor", "chat_template", "kwargs"}
    names = [n for n in inspect.signature(cls.__init__).parameters if n not in skip]
    return {n: getattr(processor, n) for n in names if hasattr(processor, n)}
