"""Locate the LLM decoder layers (and the other parameter groups) inside a model.

This is the only module that knows attribute paths.  Everything else asks it:

* :func:`find_decoder_layers` -> the decoder ``ModuleList`` and its qualified name;
* :func:`map_parameters` -> every parameter tagged with its group (a decoder layer
  and its index, embeddings, final norm, lm_head, projector, vision tower, other);
* :func:`text_config` / :func:`num_layers_from_config` -> where the LLM's depth lives.

Wrappers (``PeftModel``, DDP, DeepSpeed engines, FSDP, ``torch.compile``) are
looked through; names are always given relative to the object passed in, so
``model.get_submodule(name)`` works on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

__all__ = [
    "DecoderLayers",
    "ParamInfo",
    "find_decoder_layers",
    "map_parameters",
    "unwrap_model",
    "text_config",
    "num_layers_from_config",
    "visual_entry_layers",
    "check_same_model",
    "model_identity",
    "GROUPS",
]

# Known decoder paths, relative to the unwrapped model, tried in order.
KNOWN_PATHS = (
    "model.language_model.layers",  # HF VLMs, transformers >= 4.52 / 5.x (Llava*, Qwen2-VL, PaliGemma)
    "language_model.model.layers",  # HF VLMs, transformers <= 4.51
    "model.text_model.layers",  # Idefics3
    "language_model.layers",  # a VLM base model (e.g. LlavaModel) without head
    "text_model.layers",  # Idefics3Model
    "model.layers",  # LLaVA / Bunny classes, Qwen2-VL <= 4.51, plain *ForCausalLM
    "layers",  # a bare decoder (LlamaModel)
    "transformer.blocks",  # MPT
    "transformer.h",  # GPT-2 style, old phi-msft
    "gpt_neox.layers",
    "model.decoder.layers",  # OPT
)
# Module-name components that mark the multimodal projector (checked before vision).
PROJECTOR_KEYS = (
    "mm_projector",
    "multi_modal_projector",
    "connector",
    "merger",
    "deepstack_merger_list",
    "vision_resampler",
    "mm_resampler",
    "image_newline",
)
# Module-name components that mark the vision tower.
VISION_KEYS = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder", "vision_embed_tokens")
NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f")
EMBED_NAMES = ("embed_tokens", "wte", "embed_in", "word_embeddings")

GROUPS = ("layer", "embeddings", "norm", "lm_head", "projector", "vision", "other")


class DecoderLayers(NamedTuple):
    """The LLM's decoder layers and their qualified name relative to the model given."""

    layers: nn.ModuleList
    name: str


@dataclass
class ParamInfo:
    """One parameter with its group (one of :data:`GROUPS`) and, for ``layer``, its layer index."""

    name: str
    param: nn.Parameter
    group: str
    layer: Optional[int] = None


def _mro_names(obj: object) -> set:
    return {cls.__name__ for cls in type(obj).__mro__}


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the model inside PEFT / DDP / DeepSpeed / FSDP / ``torch.compile`` wrappers."""
    for _ in range(16):
        names = _mro_names(model)
        if "PeftModel" in names:
            model = model.base_model
        elif "BaseTuner" in names:  # peft's LoraModel & co.
            model = model.model
        elif names & {"DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "FullyShardedDataParallel"}:
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
    return model


def _components(name: str) -> list:
    return name.split(".") if name else []


def _is_vision_path(name: str) -> bool:
    return any(part in VISION_KEYS for part in _components(name))


def _get(module: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def _name_in(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules(remove_duplicate=False):
        if module is target:
            return name
    raise LookupError("module not found under the given root")  # pragma: no cover - internal invariant


def _module_lists(root: nn.Module) -> list:
    return [(n, m) for n, m in root.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def _describe_lists(root: nn.Module) -> str:
    seen = [f"{n or '<root>'} ({len(m)} x {type(m[0]).__name__})" for n, m in _module_lists(root)]
    return "; ".join(seen) if seen else "none"


def _input_embeddings(core: nn.Module) -> Optional[nn.Module]:
    getter = getattr(core, "get_input_embeddings", None)
    if getter is None:
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def _structural_candidates(core: nn.Module) -> list:
    """ModuleLists that sit beside the token embedding (outside any vision tower)."""
    embed = _input_embeddings(core)
    found = []
    for name, mlist in _module_lists(core):
        if _is_vision_path(name):
            continue
        parent = _get(core, name.rpartition(".")[0])
        if parent is None:
            continue
        owns_embedding = embed is not None and any(child is embed for child in parent.children())
        owns_embedding = owns_embedding or any(isinstance(getattr(parent, e, None), nn.Embedding) for e in EMBED_NAMES)
        if owns_embedding:
            found.append((name, mlist))
    return found


def find_decoder_layers(model: nn.Module, path: Optional[str] = None) -> DecoderLayers:
    """Find the LLM's decoder-layer ``ModuleList`` (never a vision encoder's).

    ``path`` overrides discovery with an explicit dotted path, relative to the
    model given or to the model inside its wrappers.  Raises ``LookupError``
    listing every ``ModuleList`` seen when nothing matches.
    """
    core = unwrap_model(model)
    if path:
        target = _get(model, path) or _get(core, path)
        if not isinstance(target, nn.ModuleList) or len(target) == 0:
            raise LookupError(
                f"layers path {path!r} does not name a non-empty nn.ModuleList in {type(core).__name__}; "
                f"ModuleLists seen: {_describe_lists(core)}"
            )
        return DecoderLayers(target, _name_in(model, target))

    for candidate in KNOWN_PATHS:
        target = _get(core, candidate)
        if isinstance(target, nn.ModuleList) and len(target) > 0 and not _is_vision_path(candidate):
            return DecoderLayers(target, _name_in(model, target))

    candidates = _structural_candidates(core)
    if len(candidates) == 1:
        return DecoderLayers(candidates[0][1], _name_in(model, candidates[0][1]))
    why = "several candidates" if candidates else "no candidate"
    raise LookupError(
        f"Could not find the LLM decoder layers of {type(core).__name__} ({why}). "
        f"ModuleLists seen: {_describe_lists(core)}. Pass the path explicitly, e.g. "
        f"layers_path='model.language_model.layers' (CLI: --layers_path)."
    )


def _owner(model: nn.Module, location: DecoderLayers) -> nn.Module:
    return _get(model, location.name.rpartition(".")[0]) or unwrap_model(model)


def _special_modules(model: nn.Module, location: DecoderLayers) -> dict:
    """The LLM's embeddings, final norm and lm_head modules (those that exist)."""
    core = unwrap_model(model)
    owner = _owner(model, location)
    found = {}
    embed = _input_embeddings(core)
    if embed is None:
        embed = next((getattr(owner, n) for n in EMBED_NAMES if isinstance(getattr(owner, n, None), nn.Module)), None)
    if embed is not None:
        found["embeddings"] = embed
    norm = next((getattr(owner, n) for n in NORM_NAMES if isinstance(getattr(owner, n, None), nn.Module)), None)
    if norm is not None:
        found["norm"] = norm
    getter = getattr(core, "get_output_embeddings", None)
    head = None
    if getter is not None:
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    if isinstance(head, nn.Module):
        found["lm_head"] = head
    return found


def map_parameters(model: nn.Module, location: Optional[DecoderLayers] = None) -> list:
    """Every parameter of ``model`` (names relative to it) tagged with its group.

    Groups: ``layer`` (with the decoder-layer index), ``embeddings``, ``norm``,
    ``lm_head``, ``projector``, ``vision``, ``other``.  Tied parameters appear
    once, in the first group that claims them (embeddings before lm_head).
    """
    location = location or find_decoder_layers(model)
    layer_of = {}
    for index, layer in enumerate(location.layers):
        for param in layer.parameters():
            layer_of[id(param)] = index
    special = {}
    for group, module in _special_modules(model, location).items():
        for param in module.parameters():
            special.setdefault(id(param), group)

    out = []
    for name, param in model.named_parameters():
        if id(param) in layer_of:
            out.append(ParamInfo(name, param, "layer", layer_of[id(param)]))
            continue
        if id(param) in special:
            out.append(ParamInfo(name, param, special[id(param)]))
            continue
        parts = _components(name)
        if any(part in PROJECTOR_KEYS for part in parts):
            group = "projector"
        elif any(part in VISION_KEYS for part in parts):
            group = "vision"
        else:
            group = "other"
        out.append(ParamInfo(name, param, group))
    return out


def numel(param: torch.Tensor) -> int:
    """Logical number of elements, also for ZeRO-3 partitions and packed 4-bit weights."""
    from .backends.bitsandbytes import logical_shape
    from .backends.deepspeed import logical_numel

    partitioned = logical_numel(param)
    if partitioned:
        return partitioned
    shape = logical_shape(param)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def text_config(config_or_model: Any) -> Any:
    """The config that holds the LLM's depth: ``text_config`` when present, else the config itself."""
    config = config_or_model
    if isinstance(config_or_model, nn.Module):
        config = getattr(unwrap_model(config_or_model), "config", None)
    if config is None:
        raise ValueError(f"{type(config_or_model).__name__} has no config")
    sub = getattr(config, "text_config", None)
    return sub if sub is not None else config


def num_layers_from_config(config: Any) -> int:
    """The LLM's number of decoder layers as stated by a (possibly multimodal) config."""
    from .layer_fields import DEPTH_KEYS

    tc = text_config(config)
    for key in DEPTH_KEYS:
        value = getattr(tc, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ValueError(
        f"{type(config).__name__} states no decoder depth (looked for num_hidden_layers / n_layers / n_layer "
        "on the config and its text_config)"
    )


def _config_of(source: Any) -> Any:
    return getattr(unwrap_model(source), "config", None) if isinstance(source, nn.Module) else source


def visual_entry_layers(source: Any) -> dict:
    """``{layer: why}``: the decoder layers (current numbering) where visual features enter the LLM.

    ``source`` is a model or its config. Found from the config, so a pruned model (whose config was remapped)
    answers in its own numbering:

    * Mllama: the text config's ``cross_attention_layers``, the only layers that see the image;
    * Qwen3-VL (dense and MoE): DeepStack adds the features of vision layers ``deepstack_visual_indexes[k]`` to
      the output of LLM layer ``k``, so layers ``0 .. len(deepstack_visual_indexes) - 1``.

    A new family whose images enter at particular layers is added here; pruning protects what this returns.
    """
    config = _config_of(source)
    if config is None:
        return {}
    entry: dict = {}
    text = text_config(config)
    for index in getattr(text, "cross_attention_layers", None) or []:
        entry[int(index)] = "cross-attention layer: the only place image features enter the LLM"
    vision = getattr(config, "vision_config", None)
    for k, vision_layer in enumerate(getattr(vision, "deepstack_visual_indexes", None) or []):
        entry.setdefault(k, f"DeepStack target: vision layer {vision_layer}'s features are added after it")
    return dict(sorted(entry.items()))


_IDENTITY_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                    "vocab_size")  # fmt: skip


def model_identity(config: Any) -> dict:
    """What a scores file records of the model it scored, to be matched before pruning with those scores.

    ``original_num_layers`` and ``layer_ids`` (each current layer's index in the original model: pruning keeps
    them, so scores of the unpruned model still apply to a pruned one by original numbering) and a
    ``fingerprint`` of the LLM's shape that pruning does not change.
    """
    import hashlib
    import json

    from .record import read_pruning

    text = text_config(config)
    pruning = read_pruning(config)
    depth = num_layers_from_config(config)
    original = pruning.original_num_layers if pruning is not None else depth
    ids = pruning.kept if pruning is not None and pruning.kept else list(range(depth))
    shape = {k: getattr(text, k, None) for k in _IDENTITY_FIELDS}
    shape["original_num_layers"] = original
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"original_num_layers": int(original), "layer_ids": [int(i) for i in ids], "fingerprint": digest}


def check_same_model(identity: dict, config: Any, source: str, subject: str = "this one") -> dict:
    """Raise ``ValueError`` unless ``identity`` (a scores file's :func:`model_identity`) is ``config``'s model.

    ``source`` names the scores in the message, ``subject`` the model they are matched against. Returns this
    model's identity.
    """
    mine = model_identity(config)
    if (
        identity.get("fingerprint") != mine["fingerprint"]
        or identity.get("original_num_layers") != mine["original_num_layers"]
    ):
        raise ValueError(
            f"{source} belong to another model (fingerprint {identity.get('fingerprint')}, "
            f"{identity.get('original_num_layers')} original layers) than {subject} (fingerprint "
            f"{mine['fingerprint']}, {mine['original_num_layers']} original layers); score this model (vr-plugin score)"
        )
    return mine
