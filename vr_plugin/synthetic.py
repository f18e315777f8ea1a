"""A synthetic visual question-answering set rendered with PIL, in LLaVA's conversation format.

Pictures show 1-3 coloured shapes on a grey canvas; questions ask for the colour, the shape, the count or
the position (left/right) of the shapes, with one-word answers.  Everything is deterministic given the
seed, so the demo, the tests and the benchmarks see the same data.

Layout written by :func:`make_vqa_dataset`::

    out_dir/images/000017.png
    out_dir/train.json     # [{"id", "image", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}]
    out_dir/test.json
    out_dir/calibration.json   # "Please describe this image in detail." over the test images
    out_dir/captions.json      # the same prompt over the train images, answered with a full caption
                               # ("two red circles on the left"), for pre-training a base model
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional

__all__ = [
    "COLOURS",
    "SHAPES",
    "random_scene",
    "QUESTIONS",
    "render",
    "caption",
    "make_vqa_dataset",
    "CALIBRATION_PROMPT",
    "TEXT_QUESTION",
    "arithmetic_facts",
    "make_text_dataset",
]

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (50, 80, 220), "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "What shape are they?",
    "count": "How many shapes are there?",
    "position": "Are the shapes on the left or on the right?",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
CALIBRATION_PROMPT = "Please describe this image in detail."
TEXT_QUESTION = "What is {a} plus {b}?"  # the text-only task of vr-plugin study: sums with exact answers


def _draw(draw, shape: str, box: tuple, fill: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render(scene: dict, size: int = 64):
    """Draw a scene ``{"colour", "shape", "count", "position"}`` as an RGB PIL image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    cell = size // 3
    column = 0 if scene["position"] == "left" else size // 2
    for row in range(scene["count"]):
        x0 = column + size // 16
        y0 = row * cell + size // 32
        _draw(draw, scene["shape"], (x0, y0, x0 + cell - 2, y0 + cell - 2), COLOURS[scene["colour"]])
    return image


def random_scene(rng: random.Random) -> dict:
    """A scene drawn by ``rng``: colour, shape, count (1-3) and position (left/right), for :func:`render`."""
    return {
        "colour": rng.choice(sorted(COLOURS)),
        "shape": rng.choice(SHAPES),
        "count": rng.randint(1, 3),
        "position": rng.choice(["left", "right"]),
    }


def _answer(scene: dict, kind: str) -> str:
    return COUNT_WORDS[scene["count"]] if kind == "count" else str(scene[kind])


def caption(scene: dict) -> str:
    """Everything a scene shows in a few words: ``"two red circles on the left"``."""
    plural = "s" if scene["count"] > 1 else ""
    return f"{COUNT_WORDS[scene['count']]} {scene['colour']} {scene['shape']}{plural} on the {scene['position']}"


def make_vqa_dataset(
    out_dir: str,
    n_train: int = 64,
    n_test: int = 32,
    seed: int = 0,
    image_size: int = 64,
    kinds: Optional[tuple] = None,
) -> dict:
    """Write images and LLaVA-format ``train.json`` / ``test.json`` / ``calibration.json`` / ``captions.json``;
    return their paths."""
    rng = random.Random(seed)
    kinds = tuple(kinds or QUESTIONS)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    splits: dict = {"train": [], "test": [], "calibration": [], "captions": []}
    for index in range(n_train + n_test):
        scene = random_scene(rng)
        name = f"{index:06d}.png"
        render(scene, image_size).save(os.path.join(image_dir, name))
        kind = kinds[index % len(kinds)]
        split = "train" if index < n_train else "test"
        splits[split].append(
            {
                "id": f"{split}-{index:06d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{QUESTIONS[kind]}"},
                    {"from": "gpt", "value": _answer(scene, kind)},
                ],
            }
        )
        if split == "train":
            splits["captions"].append(
                {
                    "id": f"caption-{index:06d}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{CALIBRATION_PROMPT}"},
                        {"from": "gpt", "value": caption(scene)},
                    ],
                }
            )
        if split == "test":
            splits["calibration"].append(
                {
                    "id": f"calibration-{index:06d}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{CALIBRATION_PROMPT}"},
                        {"from": "gpt", "value": f"{_answer(scene, 'count')} {scene['colour']} {scene['shape']}"},
                    ],
                }
            )
    paths = {"images": image_dir}
    for split, records in splits.items():
        path = os.path.join(out_dir, f"{split}.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1)
        paths[split] = path
    return paths


def corpus() -> list:
    """Text the tiny tokenizers are trained on: every question, answer and a few template words."""
    words = [*COLOURS, *SHAPES, *COUNT_WORDS.values(), "left", "right", CALIBRATION_PROMPT, *QUESTIONS.values()]
    lines = [" ".join(words)] * 4
    rng = random.Random(0)
    for _ in range(400):
        lines.append(" ".join(rng.choice(words) for _ in range(8)))
    lines += [
        "A chat between a curious user and an artificial intelligence assistant.",
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "USER: ASSISTANT: system user assistant",
    ]
    return lines


def arithmetic_facts(max_operand: int = 10) -> list:
    """Every ``(question, answer)`` of the text-only task: ``("What is 3 plus 4?", "7")`` for ``0 <= a, b <
    max_operand``, in order."""
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    return [(TEXT_QUESTION.format(a=a, b=b), str(a + b)) for a in range(max_operand) for b in range(max_operand)]


def make_text_dataset(out_dir: str, max_operand: int = 10, seed: int = 0, repeats: int = 1) -> dict:
    """Write the text-only task in LLaVA's format (records without ``image``): ``text_train.json`` (every fact of
    :func:`arithmetic_facts`, ``repeats`` times, shuffled by ``seed``) and ``text_test.json`` (each fact once, in
    order); return their paths.

    The test questions are the training questions on purpose: the task stands for what an LLM knows before visual
    instruction tuning (as MMLU does for a real one), and measures how much of it survives that tuning.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    facts = arithmetic_facts(max_operand)

    def record(split: str, index: int, question: str, answer: str) -> dict:
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return {"id": f"{split}-{index:06d}", "conversations": turns}

    train = [record("text-train", i, q, a) for i, (q, a) in enumerate(facts * repeats)]
    random.Random(seed).shuffle(train)
    splits = {"text_train": train, "text_test": [record("text-test", i, q, a) for i, (q, a) in enumerate(facts)]}
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, records in splits.items():
        path = os.path.join(out_dir, f"{split}.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1)
        paths[split] = path
    return paths
