"""Remove decoder layers outside the visual region, correctly: :func:`prune_outside_region`.

Layer surgery that survives ``save_pretrained`` / ``from_pretrained`` and cached generation:

1. the kept layers become a new ``ModuleList`` in their original order;
2. every ``layer_idx`` attribute inside a kept layer (attention, the layer itself, ...) is renumbered, so the
   KV cache is addressed by the new positions;
3. every per-layer field of the LLM config follows by meaning (:mod:`vr_plugin.layer_fields`): the depth,
   per-layer lists sliced, index lists (``cross_attention_layers``, ``moe_layers``, ...) remapped, thresholds
   recounted, periodic rules rewritten; a field that cannot follow is refused before anything changes, and a
   module that keeps its own copy of such a field (``MllamaTextModel.cross_attention_layers``) gets the new value;
4. layers that scale their residuals by the model depth (MiniCPM) are rescaled to stay exact at the new depth;
5. layers where visual features enter the LLM (:func:`vr_plugin.locate.visual_entry_layers`) are protected like
   the region: refused when named, never chosen by scores, unless ``allow_visual_entry``;
6. the config records the removed and protected layers (original numbering) and the original depth, and the
   region record is renumbered to the new positions.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .layer_fields import INDEX_LISTS, PER_LAYER, plan_layer_fields
from .locate import find_decoder_layers, text_config, unwrap_model, visual_entry_layers
from .record import PruningRecord, read_pruning, read_region, write_pruning, write_region
from .region import Region, as_region, spec_text
from .spec import select_layers

__all__ = ["prune_outside_region", "choose_layers_to_remove", "remove_layers"]

logger = logging.getLogger(__name__)

_INDEX_ATTRIBUTES = ("layer_idx", "layer_id", "layer_index")
_COPIED_FIELDS = INDEX_LISTS + PER_LAYER  # fields a module may keep its own copy of


def _scores_and_metric(scores: Any, model: Optional[nn.Module] = None) -> tuple:
    """``({layer: score}, metric name or None)`` in ``model``'s current numbering, from a dict, a ScoreReport or a
    scores JSON path; scores of another model (or of another depth) are refused, naming both."""
    if scores is None:
        return {}, None
    source = scores if isinstance(scores, str) else "the scores"
    if isinstance(scores, str):
        from .score import load_scores

        scores = load_scores(scores)
    if not hasattr(scores, "scores"):
        by_layer, identity, metric = {int(k): float(v) for k, v in dict(scores).items()}, {}, None
    else:
        if getattr(scores, "n", 1) != 1:
            raise ValueError(f"these are {scores.n}-layer block scores; prune with per-layer scores (n=1)")
        by_layer, identity, metric = dict(scores.scores), getattr(scores, "identity", {}), scores.metric
    if model is None:
        return by_layer, metric
    return _match_scores(by_layer, identity, model, source), metric


def _match_scores(by_layer: dict, identity: dict, model: nn.Module, source: str) -> dict:
    """Scores of the model they were computed on, mapped to ``model``'s current layers by original numbering."""
    from .locate import check_same_model, model_identity

    mine = model_identity(unwrap_model(model).config)
    depth = len(mine["layer_ids"])
    if not identity:  # a plain dict or an older scores file: only the depth can be checked
        extra = sorted(i for i in by_layer if not 0 <= i < depth)
        if extra:
            raise ValueError(f"{source} cover layers up to {max(by_layer)}, but this model has {depth} layers")
        return by_layer
    check_same_model(identity, unwrap_model(model).config, source)
    position = {original: j for j, original in enumerate(identity.get("layer_ids", []))}
    return {
        i: by_layer[position[o]] for i, o in enumerate(mine["layer_ids"]) if o in position and position[o] in by_layer
    }


def _as_number(remove: Any) -> Any:
    """A numpy / torch scalar as a Python int or float; anything else unchanged."""
    if isinstance(remove, (bool, int, float, str)) or not hasattr(remove, "item") or getattr(remove, "ndim", 0):
        return remove
    return remove.item()


def _count(remove: Union[int, float], num_layers: int) -> int:
    if isinstance(remove, bool):
        raise ValueError(f"remove={remove!r}: give a layer count (4) or a ratio in (0, 1) (0.125)")
    if isinstance(remove, float) and 0.0 < remove < 1.0:
        return max(1, int(remove * num_layers + 0.5))
    if isinstance(remove, int) and 0 <= remove < num_layers:
        return remove
    raise ValueError(
        f"remove={remove!r} for a model with {num_layers} layers: give a count 0..{num_layers - 1} or a ratio in (0, 1)"
    )


def choose_layers_to_remove(
    scores: dict,
    remove: Union[int, float],
    region: Iterable[int],
    num_layers: int,
    allow_region: bool = False,
    protected: Iterable[int] = (),
) -> list:
    """The ``remove`` lowest-scoring layers, never one of ``region`` unless ``allow_region`` and never one of
    ``protected`` (visual-entry layers; ties: lower index)."""
    k = _count(remove, num_layers)
    region, protected = set(region), set(protected)
    candidates = [i for i in range(num_layers) if (allow_region or i not in region) and i not in protected]
    missing = [i for i in candidates if i not in scores]
    if missing:
        raise ValueError(f"scores are missing for layers {missing} (the scores cover {len(scores)} layers)")
    if k > len(candidates):
        kept_back = f" and the visual-entry layers {sorted(protected)}" if protected else ""
        raise ValueError(
            f"cannot remove {k} layers: only {len(candidates)} lie outside the region {sorted(region)}{kept_back} "
            "(allow_region=True to let region layers go too)"
        )
    return sorted(sorted(candidates, key=lambda i: (scores[i], i))[:k])


def _renumber(layer: nn.Module, new_index: int) -> None:
    for module in layer.modules():
        for attr in _INDEX_ATTRIBUTES:
            if isinstance(getattr(module, attr, None), int) and not isinstance(getattr(module, attr), bool):
                setattr(module, attr, new_index)


def _llm_configs(model: nn.Module, owner: nn.Module) -> list:
    """The distinct config objects that describe the LLM: the model's, its text config, the layers' owner's."""
    core = unwrap_model(model)
    configs = {id(core.config): core.config}
    sub = text_config(core.config)
    configs.setdefault(id(sub), sub)
    owner_config = getattr(owner, "config", None)
    if owner_config is not None:
        configs.setdefault(id(owner_config), owner_config)
    return list(configs.values())


def _plan_configs(configs: list, keep: list, old_depth: int) -> list:
    """``[(config, updates)]``, every config planned before any changes (a refused field changes nothing)."""
    plans = []
    for config in configs:
        updates, warnings = plan_layer_fields(vars(config), keep, old_depth)
        for warning in warnings:
            logger.warning("prune: %s", warning)
        plans.append((config, updates))
    return plans


def _update_module_copies(model: nn.Module, old: dict, new: dict) -> list:
    """Give modules that copied a per-layer config field (``self.cross_attention_layers = ...``) its new value."""
    changed = []
    for name, module in unwrap_model(model).named_modules():
        for key in _COPIED_FIELDS:
            if key in new and key in vars(module) and vars(module)[key] == old[key]:
                setattr(module, key, new[key])
                changed.append(f"{name}.{key}" if name else key)
    return changed


_RESIDUAL_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")


def _rescale_depth_scaled(layers: Iterable[nn.Module], new_depth: int) -> int:
    """Keep MiniCPM-style residuals right at the new depth; return how many layers were rescaled.

    Such a layer adds each residual branch times ``scale_depth / sqrt(num_hidden_layers)``, with the depth it was
    built for. A pruned checkpoint is rebuilt with the smaller depth, so the layer is told the new depth and the
    linear maps ending its two branches absorb the difference, ``sqrt(new / old)``: the network computes the same
    function in memory, after ``save_pretrained`` and after a plain ``from_pretrained``.
    """
    count = 0
    for layer in layers:
        old = getattr(layer, "num_hidden_layers", None)
        if not isinstance(old, int) or not hasattr(layer, "scale_depth") or old == new_depth:
            continue
        outputs = []
        for name in _RESIDUAL_OUTPUTS:
            module = layer.get_submodule(name) if _has(layer, name) else None
            if type(module) is not nn.Linear:
                raise NotImplementedError(
                    f"{type(layer).__name__} scales its residuals by its depth, but its {name} is "
                    f"{type(module).__name__ if module is not None else 'missing'}, not a plain nn.Linear; merge "
                    "adapters / load unquantized before pruning"
                )
            outputs.append(module)
        factor = math.sqrt(new_depth / old)
        with torch.no_grad():
            for module in outputs:
                module.weight.mul_(factor)
                if module.bias is not None:
                    module.bias.mul_(factor)
        layer.num_hidden_layers = new_depth
        count += 1
    return count


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def remove_layers(model: nn.Module, remove: Iterable[int], layers_path: Optional[str] = None) -> list:
    """Delete decoder layers ``remove`` (current numbering) and fix indices and config; return the kept list."""
    location = find_decoder_layers(model, layers_path)
    old_depth = len(location.layers)
    remove = sorted(set(int(i) for i in remove))
    bad = [i for i in remove if not 0 <= i < old_depth]
    if bad or len(remove) >= old_depth:
        raise ValueError(f"cannot remove layers {remove} from a model with {old_depth} layers")
    keep = [i for i in range(old_depth) if i not in remove]
    owner_name, _, attribute = location.name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    plans = _plan_configs(_llm_configs(model, owner), keep, old_depth)

    new_layers = nn.ModuleList([location.layers[i] for i in keep])
    for new_index, layer in enumerate(new_layers):
        _renumber(layer, new_index)
    _rescale_depth_scaled(new_layers, len(keep))
    setattr(owner, attribute, new_layers)
    for config, updates in plans:
        old = {key: getattr(config, key) for key in updates}
        for key, value in updates.items():
            setattr(config, key, value)
        copies = _update_module_copies(model, old, updates)
        if copies:
            logger.info("prune: updated the copies in %s", ", ".join(copies))
    return keep


def _region_layers(core: nn.Module, region: Union[str, Iterable[int], None], depth: int) -> list:
    """The region in current numbering: as given, else as recorded in the config (empty when none)."""
    recorded = read_region(core)
    if isinstance(region, Region):
        return list(as_region(core, region).layers)  # checked against this model's depth
    if region is not None:
        return select_layers(region, depth)
    if recorded is None:
        return []
    if recorded.num_layers != depth:
        raise ValueError(
            f"the recorded region {recorded.layers} is for {recorded.num_layers} layers, model has {depth}"
        )
    return recorded.layers


def _explicit_removal(remove: Iterable[int], depth: int, region: list, entry: dict, allow: tuple) -> list:
    """Explicit indices, read by the spec grammar (integers in range), refused where the region or images are."""
    allow_region, allow_entry = allow
    remove = list(remove)
    try:
        removed = select_layers(remove, depth) if remove else []
    except ValueError:
        raise ValueError(
            f"remove={remove!r}: give layer indices, whole numbers in 0..{depth - 1} (e.g. remove=[2, 5]), a count "
            "or a ratio"
        ) from None
    inside = sorted(set(removed) & set(region))
    if inside and not allow_region:
        raise ValueError(f"layers {inside} are in the visual region {region}; pass allow_region=True")
    entering = [i for i in removed if i in entry]
    if entering and not allow_entry:
        why = "; ".join(f"layer {i}: {entry[i]}" for i in entering)
        raise ValueError(
            f"layers {entering} are where visual features enter the LLM ({why}); removing them moves or deletes "
            "the image input. Pass allow_visual_entry=True (CLI: --allow_visual_entry) to remove them anyway"
        )
    return removed


def _choose(model: nn.Module, depth: int, remove: Any, scores: Any, region: list, allow: tuple) -> tuple:
    """Decide: ``(removed layers, metric, visual-entry layers protected)`` in current numbering.

    ``allow``: ``(allow_region, allow_visual_entry)``.
    """
    allow_region, allow_entry = allow
    remove = _as_number(remove)
    entry = visual_entry_layers(model)
    protected = {} if allow_entry else entry
    scores_by_layer, metric = _scores_and_metric(scores, model)
    if isinstance(remove, (int, float)):  # bool too: _count rejects it
        if not scores_by_layer and _count(remove, depth) > 0:
            raise ValueError("prune_outside_region needs scores= (from vr_plugin.score_layers) to choose layers")
        removed = choose_layers_to_remove(scores_by_layer, remove, region, depth, allow_region, protected)
    else:
        removed = _explicit_removal(remove, depth, region, entry, allow)
    return removed, metric, protected


def _record(core: nn.Module, removed: list, keep: list, depth: int, metric: Any, protected: dict) -> PruningRecord:
    """The pruning record in original numbering, also across repeated pruning."""
    previous = read_pruning(core)
    original_ids = previous.kept if previous is not None and previous.kept else list(range(depth))
    all_protected = dict(previous.protected) if previous is not None else {}
    all_protected.update({original_ids[i]: why for i, why in protected.items()})
    return PruningRecord(
        original_num_layers=previous.original_num_layers if previous is not None else depth,
        removed=sorted((previous.removed if previous is not None else []) + [original_ids[i] for i in removed]),
        kept=[original_ids[i] for i in keep],
        metric=metric,
        protected=dict(sorted(all_protected.items())),
    )


def prune_outside_region(
    model: nn.Module,
    *,
    region: Union[str, Iterable[int], None] = None,
    remove: Union[int, float, Iterable[int]] = 0,
    scores: Any = None,
    allow_region: bool = False,
    layers_path: Optional[str] = None,
    allow_visual_entry: bool = False,
) -> PruningRecord:
    """Remove the ``remove`` lowest-scoring decoder layers outside the visual region, in place.

    ``region``: a spec or indices (current numbering); by default the region recorded in the model's config
    (``'none'`` if there is none: then any layer may go). ``remove``: a count, a ratio in (0, 1), or explicit
    layer indices. ``scores``: ``{layer: score}`` (higher = more important), a :class:`ScoreReport` or a
    scores JSON path. Region layers are refused unless ``allow_region``; layers where visual features enter
    (:func:`vr_plugin.locate.visual_entry_layers`: cross-attention, DeepStack targets) unless
    ``allow_visual_entry``. Returns the pruning record written to the config (removed and protected layers in
    the *original* numbering, also across repeated pruning).
    """
    core = unwrap_model(model)
    depth = len(find_decoder_layers(model, layers_path).layers)
    recorded = read_region(core)
    region_layers = _region_layers(core, region, depth)
    allow = (allow_region, allow_visual_entry)
    removed, metric, protected = _choose(model, depth, remove, scores, region_layers, allow)
    if not removed:
        logger.info("prune_outside_region: nothing to remove")
    keep = remove_layers(model, removed, layers_path) if removed else list(range(depth))

    record = _record(core, removed, keep, depth, metric, protected)
    write_pruning(core.config, record)
    if region_layers or recorded is not None:
        new_region = [keep.index(i) for i in region_layers if i in keep]
        spec = recorded.spec if recorded is not None and region is None else spec_text(region)
        write_region(core.config, spec, new_region, len(keep))
    logger.info(
        "pruned %d layers %s; removed in all (original numbering) %s; %d of %d original layers kept%s",
        len(removed),
        removed,
        record.removed,
        len(keep),
        record.original_num_layers,
        f"; visual-entry layers {sorted(record.protected)} protected" if protected else "",
    )
    return record
