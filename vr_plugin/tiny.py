"""Tiny LVLMs built from configs, for the demo, the benchmarks and the tests.

Nothing is downloaded: configs are written here, weights are random, the
tokenizer is trained locally.  :func:`build_model` gives an in-memory model of
one of :data:`ARCHITECTURES`; :func:`save_tiny_lvlm` writes a complete model
directory (config, safetensors, tokenizer, processor, chat template) that loads
back with the ordinary ``from_pretrained`` calls.
"""

from __future__ import annotations

from typing import Any, Optional

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
}
ARCHITECTURES = tuple(_CLASSES)

IMAGE_SIZE = 32
PATCH = 8
VOCAB = 512
IMAGE_TOKEN_ID = VOCAB - 1
_GRID_PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE]]  # LLaVA-NeXT any-res grid
_QWEN_PATCH = 4  # Qwen2-VL ViT patch; 2x2 patches merge into one LLM token


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
    text = dict(model_type="llama", **text_kwargs(num_layers, hidden))
    text.update(text_overrides)
    if arch == "llama":
        return config_cls(**{**text_kwargs(num_layers, hidden), **text_overrides}, **overrides)
    if arch in ("llava", "llava_next"):
        kwargs = dict(
            text_config=text, vision_config=_vision("clip_vision_model", hidden), image_token_index=IMAGE_TOKEN_ID
        )
        if arch == "llava_next":
            kwargs["image_grid_pinpoints"] = _GRID_PINPOINTS
        elif _accepts_init(config_cls, "image_seq_length"):  # transformers < 4.52 treats fewer tokens as legacy input
            kwargs["image_seq_length"] = (IMAGE_SIZE // PATCH) ** 2
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
            vocab_size=text["vocab_size"],
        )
    elif arch == "idefics3":
        kwargs = dict(
            text_config=text,
            vision_config=_vision("idefics3_vision", hidden),
            image_token_id=IMAGE_TOKEN_ID,
            scale_factor=2,
        )
    else:  # qwen2_vl / qwen2_5_vl
        half = hidden // text["num_attention_heads"] // 2  # rotary frequencies per head, split over (t, h, w)
        section = [half // 4, half // 4, half - 2 * (half // 4)]
        text.update(model_type=arch + "_text", rope_scaling={"type": "mrope", "mrope_section": section})
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


def _accepts_init(cls: type, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(cls.__init__).parameters


def image_token_count(config: Any) -> int:
    """How many placeholder tokens one IMAGE_SIZE x IMAGE_SIZE image takes in ``config``'s model."""
    model_type = getattr(config, "model_type", "")
    if model_type.startswith("qwen2"):
        vision = config.vision_config
        side = IMAGE_SIZE // vision.patch_size // vision.spatial_merge_size
        return side * side
    if model_type == "llava" and not _accepts_init(type(config), "image_seq_length"):
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


# --------------------------------------------------------------------------------------------------------------
# Complete local model directories: model + locally trained tokenizer + processor + chat template.

LVLM_ARCHITECTURES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")

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

# Text the templates write, so that the tokenizer learns it as words rather than bytes.
_TEMPLATE_TEXT = [
    "USER: ASSISTANT: USER: ASSISTANT:",
    "[INST] [/INST] [INST] [/INST]",
    "system\nYou are a helpful assistant.\nuser\nassistant\n",
    "Picture 1: Video 1:",
]


def _recipe(arch: str) -> dict:
    """Special tokens, chat template and token roles of ``arch``'s tokenizer."""
    if arch in ("llava", "llava_next"):
        return dict(
            specials=["<pad>", "<s>", "</s>"],  # ids 0, 1, 2 as in text_kwargs
            added=["<image>"],
            roles=dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>"),
            extra=dict(image_token="<image>"),
            template=LLAVA_CHAT_TEMPLATE if arch == "llava" else LLAVA_NEXT_CHAT_TEMPLATE,
        )
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        return dict(
            specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            added=["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
            roles=dict(pad_token="<|endoftext|>", eos_token="<|im_end|>"),  # Qwen adds no bos
            extra=dict(image_token="<|image_pad|>", video_token="<|video_pad|>"),
            template=QWEN2_VL_CHAT_TEMPLATE,
        )
    raise ValueError(f"no tiny tokenizer/processor recipe for {arch!r}; choose from {', '.join(LVLM_ARCHITECTURES)}")


def build_tokenizer(arch: str) -> Any:
    """A byte-level BPE tokenizer trained (deterministically) on :func:`synthetic.corpus` for ``arch``.

    Special tokens come first (pad/bos/eos or Qwen's ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``), the
    image tokens last; Llava-family tokenizers prepend ``<s>``, Qwen's add nothing, as the real checkpoints do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from .synthetic import corpus

    recipe = _recipe(arch)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,  # an upper bound: the corpus runs out of merges well before
        special_tokens=recipe["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus() + _TEMPLATE_TEXT, trainer)
    backend.add_special_tokens(recipe["added"])
    bos = recipe["roles"].get("bos_token")
    if bos is not None:
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
    """
    template = _recipe(arch)["template"]
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if arch == "llava":
        images = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop)
        return transformers.LlavaProcessor(
            images,
            tokenizer,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
    if arch == "llava_next":
        images = transformers.LlavaNextImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size=crop, image_grid_pinpoints=_GRID_PINPOINTS
        )
        return transformers.LlavaNextProcessor(
            images,
            tokenizer,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        from .data import image_only_processor_class

        pixels = IMAGE_SIZE * IMAGE_SIZE
        images = transformers.Qwen2VLImageProcessor(
            min_pixels=pixels, max_pixels=pixels, patch_size=_QWEN_PATCH, temporal_patch_size=2, merge_size=2
        )
        name = "Qwen2VLProcessor" if arch == "qwen2_vl" else "Qwen2_5_VLProcessor"
        try:
            video = transformers.Qwen2VLVideoProcessor(**_qwen_video_config())
            return getattr(transformers, name)(images, tokenizer, video, chat_template=template)
        except ImportError:  # transformers >= 5 needs torchvision for any Qwen2-VL video processor
            return image_only_processor_class(getattr(transformers, name))(images, tokenizer, chat_template=template)
    raise ValueError(f"no tiny processor for {arch!r}; choose from {', '.join(LVLM_ARCHITECTURES)}")


def _qwen_video_config() -> dict:
    pixels = IMAGE_SIZE * IMAGE_SIZE
    return dict(min_pixels=pixels, max_pixels=pixels, patch_size=_QWEN_PATCH, temporal_patch_size=2, merge_size=2)


def save_tiny_lvlm(arch: str, out_dir: str, num_layers: int = 8, hidden: int = 64, seed: int = 0) -> str:
    """Write a complete tiny HF-native LVLM of ``arch`` (one of :data:`LVLM_ARCHITECTURES`) into ``out_dir``.

    The directory holds the model (random weights, ``num_layers`` LLM layers of width ``hidden``), its generation
    config, a locally trained tokenizer, the processor and the chat template, and loads back with
    ``AutoProcessor.from_pretrained`` / ``AutoModelForImageTextToText.from_pretrained``.  (Qwen2-VL processors of
    transformers >= 5 need torchvision for their video processor; :func:`vr_plugin.data.load_processor` loads the
    directory without it.)  Returns ``out_dir``.
    """
    import json
    import os

    if arch not in LVLM_ARCHITECTURES:
        raise ValueError(f"save_tiny_lvlm has no recipe for {arch!r}; choose from {', '.join(LVLM_ARCHITECTURES)}")
    tokenizer = build_tokenizer(arch)
    processor = build_processor(arch, tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    qwen = arch.startswith("qwen")
    bos = tokenizer.pad_token_id if qwen else tokenizer.bos_token_id  # Qwen2-VL's config names <|endoftext|> as bos
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    text = dict(vocab_size=len(tokenizer), pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    if qwen:
        tokens = dict(
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
    else:
        tokens = dict(image_token_index=ids("<image>"))
    model = build_model(arch, num_layers, hidden, seed, text_overrides=text, **tokens)
    model.generation_config = transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    if qwen and getattr(processor, "video_processor", None) is None:  # made without torchvision: add what it lacks
        path = os.path.join(out_dir, "processor_config.json")
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        video = dict(video_processor_type="Qwen2VLVideoProcessor", **_qwen_video_config())
        config["video_processor"] = video
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
    return out_dir
