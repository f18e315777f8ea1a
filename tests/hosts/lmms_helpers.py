"""Helpers of tests/hosts/test_lmms_eval.py: documents, a local lmms-eval task, an entry-point distribution."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

TASK = "vr_tiny_vqa"

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function vr_tiny_utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]
"""


def docs_from(records_json: str, images: str) -> list:
    """``[{"image": PIL, "path", "q", "a"}]`` from a LLaVA-format file of single-turn questions."""
    with open(records_json, encoding="utf-8") as handle:
        records = json.load(handle)
    docs = []
    for record in records:
        path = os.path.join(images, record["image"])
        human, gpt = record["conversations"][0]["value"], record["conversations"][1]["value"]
        question = human.replace("<image>", "").strip()
        docs.append({"image": Image.open(path).convert("RGB"), "path": path, "q": question, "a": gpt})
    return docs


def write_task(folder: Path, docs: list) -> str:
    """An lmms-eval task (YAML, its doc_to_visual module, a local JSON-lines dataset) in ``folder``; returns it."""
    folder.mkdir(parents=True)
    lines = [json.dumps({"image": d["path"], "question": d["q"], "answer": d["a"]}) for d in docs]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "vr_tiny_utils.py").write_text(TASK_UTILS)
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, docs=folder / "docs.jsonl"))
    return str(folder)


def write_entry_point(folder: Path) -> None:
    """A distribution on ``folder`` that declares ``vr_pruned`` in the entry-point group ``lmms_eval.models``."""
    info = folder / "vr_plugin_lmms_eval_entry-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vr-plugin-lmms-eval-entry\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[lmms_eval.models]\nvr_pruned = vr_plugin.integrations.lmms_eval:manifests\n"
    )
