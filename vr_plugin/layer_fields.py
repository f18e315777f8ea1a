"""Per-layer fields of an LLM config, by what they mean: how each one follows a layer removal.

A pruned model is rebuilt from its saved config, so every config field that speaks of particular layers must
describe the kept layers at their new positions. :func:`plan_layer_fields` reads a config's fields and returns
their new values; :mod:`vr_plugin.prune` writes them onto the configs and onto the modules that keep a copy.
The fields come in kinds, each handled by meaning, never by the length of a list:

* one entry per layer (:data:`PER_LAYER`: ``layer_types``, ``mlp_layer_types``, ``no_rope_layers``, ...): sliced;
* lists of layer indices (:data:`INDEX_LISTS`: ``cross_attention_layers``, ``moe_layers``, ``mlp_only_layers``):
  remapped to the new positions (entries of removed layers drop out);
* thresholds "layers below k" (:data:`BELOW`: ``first_k_dense_replace``, ``max_window_layers``): the kept count
  below k;
* periodic rules (``decoder_sparse_step``): kept when the rule still holds at the new positions, else rewritten
  into an explicit equivalent (``decoder_sparse_step=1`` and every dense layer in ``mlp_only_layers``);
* fields that cannot follow a removal (:data:`REFUSED`: ``num_kv_shared_layers``): a :class:`LayerFieldError`
  naming the field.

Any other list of integers whose name speaks of layers and whose values look like layer indices gets a warning
(it is left as it is). Pure Python: no torch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = [
    "BELOW",
    "DEPTH_KEYS",
    "INDEX_LISTS",
    "PER_LAYER",
    "REFUSED",
    "LayerFieldError",
    "plan_layer_fields",
]

DEPTH_KEYS = ("num_hidden_layers", "n_layers", "n_layer", "num_layers")
PER_LAYER = ("layer_types", "mlp_layer_types", "layers_block_type", "no_rope_layers")
INDEX_LISTS = ("cross_attention_layers", "moe_layers", "mlp_only_layers")
BELOW = ("first_k_dense_replace", "max_window_layers")
REFUSED = ("num_kv_shared_layers",)
# Lists that name no LLM layer (vision-tower layers, token ids, shapes) and are never touched or warned about.
_NOT_LLM_LAYERS = ("vision_feature_layer", "architectures", "fullatt_block_indexes", "deepstack_visual_indexes")


class LayerFieldError(ValueError):
    """A config field cannot describe the kept layers; the message names the field."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(_is_int(v) for v in value)


def _remapped(value: Sequence[int], keep: Sequence[int]) -> Any:
    new_index = {old: new for new, old in enumerate(keep)}
    return type(value)(new_index[i] for i in value if i in new_index)


def _sparse_step(fields: Mapping[str, Any], keep: Sequence[int], updates: dict) -> None:
    """Qwen-MoE's rule: layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    step = fields.get("decoder_sparse_step")
    if not _is_int(step) or step <= 1 or not fields.get("num_experts"):
        return
    dense = set(fields.get("mlp_only_layers") or [])
    moe_before = [i not in dense and (i + 1) % step == 0 for i in keep]
    dense_after = set(updates.get("mlp_only_layers", _remapped(list(dense), keep)))
    moe_after = [j not in dense_after and (j + 1) % step == 0 for j in range(len(keep))]
    if moe_before != moe_after:  # the period no longer fits: say it explicitly, layer by layer
        updates["decoder_sparse_step"] = 1
        explicit = [j for j, moe in enumerate(moe_before) if not moe]
        original = fields.get("mlp_only_layers")
        updates["mlp_only_layers"] = type(original)(explicit) if isinstance(original, (list, tuple)) else explicit


def _refused(fields: Mapping[str, Any], removed: Sequence[int]) -> None:
    for key in REFUSED:
        value = fields.get(key)
        if _is_int(value) and value > 0 and removed:
            raise LayerFieldError(
                f"cannot prune layers {list(removed)}: the config's {key}={value} makes the last {value} layers "
                "reuse the key/value cache of earlier ones, which a removal would change; vr_plugin does not "
                "prune such models"
            )


def _looks_like_layer_indices(key: str, value: Any, old_depth: int) -> bool:
    if key in _NOT_LLM_LAYERS or key.startswith("vision") or not _int_list(value):
        return False
    named = "layer" in key or "block" in key
    return named and all(0 <= v < old_depth for v in value) and list(value) == sorted(set(value))


def plan_layer_fields(fields: Mapping[str, Any], keep: Sequence[int], old_depth: int) -> tuple:
    """``(updates, warnings)`` for one config's ``fields`` (e.g. ``vars(config)``) when only ``keep`` stay.

    ``keep``: the kept layers in their old numbering, ascending. ``updates`` maps field name to new value (only
    fields that change); ``warnings`` are sentences about unknown layer-like fields left alone. Raises
    :class:`LayerFieldError` when a field cannot describe the kept layers.
    """
    keep = list(keep)
    removed = [i for i in range(old_depth) if i not in keep]
    _refused(fields, removed)
    updates: dict = {}
    warnings: list = []
    for key, value in fields.items():
        if key in DEPTH_KEYS and _is_int(value) and value == old_depth:
            updates[key] = len(keep)
        elif key in INDEX_LISTS and isinstance(value, (list, tuple)):
            updates[key] = _remapped(value, keep)
        elif key in BELOW and _is_int(value):
            updates[key] = sum(1 for i in keep if i < value)
        elif key in PER_LAYER and isinstance(value, (list, tuple)):
            if len(value) != old_depth:
                raise LayerFieldError(
                    f"the config's {key} has {len(value)} entries for {old_depth} layers; fix the config first"
                )
            updates[key] = type(value)(value[i] for i in keep)
        elif key in _NOT_LLM_LAYERS:
            continue
        elif isinstance(value, (list, tuple)) and len(value) == old_depth:  # unknown: one entry per layer
            if _looks_like_layer_indices(key, value, old_depth):
                warnings.append(
                    f"config field {key}={list(value)} could be per-layer values or layer indices; it was sliced "
                    "as per-layer values (check it, or report the field)"
                )
            updates[key] = type(value)(value[i] for i in keep)
        elif _looks_like_layer_indices(key, value, old_depth):
            warnings.append(
                f"config field {key}={list(value)} looks like layer indices but vr_plugin does not know it; it was "
                "left unchanged (check it, or report the field)"
            )
    _sparse_step(fields, keep, updates)
    return {k: v for k, v in updates.items() if fields.get(k) != v}, warnings
