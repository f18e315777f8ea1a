"""The region / pruning record written into ``model.config`` (one format, read back everywhere).

``config.json`` of every checkpoint carries::

    "visual_region": {"spec": "uniform_0.25", "layers": [1, 5, ...], "num_layers": 32}
    "layer_pruning": {"original_num_layers": 32, "removed": [2, 3], "kept": [0, 1, 4, ...],
                      "protected": {"3": "cross-attention layer: ..."}}

Layer indices in ``visual_region`` always use the model's *current* numbering;
after pruning they are remapped, and ``layer_pruning`` keeps the original ones.
A LoRA checkpoint (no ``config.json`` from the Trainer) gets the same record in
``visual_region.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

__all__ = [
    "REGION_KEY",
    "PRUNING_KEY",
    "REGION_FILE",
    "RegionRecord",
    "PruningRecord",
    "write_region",
    "read_region",
    "write_pruning",
    "read_pruning",
    "save_region_file",
    "check_resume_region",
]

REGION_KEY = "visual_region"
PRUNING_KEY = "layer_pruning"
REGION_FILE = "visual_region.json"


@dataclass
class RegionRecord:
    """Which decoder layers form the visual region (current numbering)."""

    spec: str
    layers: list
    num_layers: int

    @classmethod
    def from_dict(cls, data: dict) -> RegionRecord:
        return cls(spec=str(data["spec"]), layers=[int(i) for i in data["layers"]], num_layers=int(data["num_layers"]))


@dataclass
class PruningRecord:
    """Which layers were removed from the original model (original numbering)."""

    original_num_layers: int
    removed: list
    kept: list = field(default_factory=list)
    metric: Optional[str] = None
    protected: dict = field(default_factory=dict)  # visual-entry layers kept from pruning -> why

    @classmethod
    def from_dict(cls, data: dict) -> PruningRecord:
        return cls(
            original_num_layers=int(data["original_num_layers"]),
            removed=[int(i) for i in data["removed"]],
            kept=[int(i) for i in data.get("kept", [])],
            metric=data.get("metric"),
            protected={int(k): str(v) for k, v in (data.get("protected") or {}).items()},
        )


def _get(config: Any, key: str) -> Optional[dict]:
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return value if isinstance(value, dict) else None


def write_region(config: Any, spec: str, layers: list, num_layers: int) -> RegionRecord:
    """Store the region record on a (top-level) config object."""
    record = RegionRecord(spec=str(spec), layers=[int(i) for i in layers], num_layers=int(num_layers))
    setattr(config, REGION_KEY, asdict(record))
    return record


def _load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _config_source(source: Any) -> Any:
    """Accept a config object, a dict, a model (its ``.config``) or a directory."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        merged: dict = {}
        for name in ("config.json", REGION_FILE):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                data = _load_json(file)
                merged.update(data if name == "config.json" else {REGION_KEY: data})
        return merged
    config = getattr(source, "config", None)
    return config if config is not None and not isinstance(source, dict) else source


def read_region(source: Any) -> Optional[RegionRecord]:
    """The region record of a config, model, dict or checkpoint directory (``None`` when absent)."""
    data = _get(_config_source(source), REGION_KEY)
    return RegionRecord.from_dict(data) if data else None


def write_pruning(config: Any, record: PruningRecord) -> None:
    """Store the pruning record on a (top-level) config object."""
    setattr(config, PRUNING_KEY, asdict(record))


def read_pruning(source: Any) -> Optional[PruningRecord]:
    """The pruning record of a config, model, dict or checkpoint directory (``None`` when absent)."""
    data = _get(_config_source(source), PRUNING_KEY)
    return PruningRecord.from_dict(data) if data else None


def save_region_file(directory: str, record: RegionRecord) -> str:
    """Write ``visual_region.json`` into ``directory`` (for adapter-only checkpoints)."""
    from .io import write_json

    return write_json(os.path.join(directory, REGION_FILE), asdict(record), indent=2)


def check_resume_region(checkpoint_dir: str, layers: list, spec: str = "") -> None:
    """Raise ``ValueError`` if ``checkpoint_dir`` was trained with another region than ``layers``."""
    saved = read_region(checkpoint_dir)
    if saved is not None and sorted(saved.layers) != sorted(int(i) for i in layers):
        raise ValueError(
            f"Cannot resume from {checkpoint_dir}: it was trained with visual region {saved.spec!r} "
            f"(layers {saved.layers}), but this run asks for {spec!r} (layers {sorted(layers)}). "
            "Use the same --visual_region / --tune_layers, or start a new --output_dir."
        )
