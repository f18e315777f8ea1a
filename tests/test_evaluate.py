"""vr_plugin.evaluate: answer normalization, option scoring, and batched greedy evaluation on tiny LVLM dirs."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vr_plugin.data import collate, load_processor
from vr_plugin.evaluate import evaluate, is_correct, normalize_answer, option_letter, parse_options, qa_records
from vr_plugin.synthetic import make_vqa_dataset
from vr_plugin.tiny import available, save_tiny_lvlm

ARCHS = [a for a in ("llava", "qwen2_vl") if available(a)]
MC = "Which colour are the shapes?\nA. red\nB. blue\nC. green\nAnswer with the option's letter from the given choices."


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Red.", "red"),
        ("  The   two  circles! ", "2 circles"),
        ("an apple, a pear", "apple pear"),
        ("It's LEFT", "its left"),
        ("three", "3"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_parse_options_lines_inline_and_none():
    assert parse_options(MC) == {"A": "red", "B": "blue", "C": "green"}
    assert parse_options("Colour? (A) red (B) blue (C) green") == {"A": "red", "B": "blue", "C": "green"}
    assert parse_options("Colour? A) red B) dark blue") == {"A": "red", "B": "dark blue"}
    assert parse_options("What colour are the shapes?") == {}
    assert parse_options("A. only one option") == {}
    assert parse_options("B. red\nC. blue") == {}  # letters must start at A


@pytest.mark.parametrize(
    "text, letter",
    [("B", "B"), ("B.", "B"), ("(B)", "B"), ("B. blue", "B"), ("Answer: B", "B"), ("The answer is B", "B"),
     ("blue", "B"), ("Blue.", "B"), ("b", "B"), ("a red circle", None), ("D", None), ("purple", None)],
)  # fmt: skip
def test_option_letter(text, letter):
    assert option_letter(text, parse_options(MC)) == letter


def test_is_correct_kinds():
    assert is_correct("B", "B", MC) == (True, "option")
    assert is_correct("blue", "B", MC) == (True, "option")
    assert is_correct("A. red", "B", MC) == (False, "option")
    assert is_correct("Red.", "red", "What colour are the shapes?") == (True, "exact")
    assert is_correct("red circle", "red", "What colour are the shapes?") == (False, "exact")
    # options listed, but the reference names none of them: exact match
    assert is_correct("purple", "purple", MC) == (True, "exact")


def test_qa_records_need_a_final_answer(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(
        json.dumps(
            [
                {"id": "ok", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "yes"}]},
                {"id": "open", "conversations": [{"from": "human", "value": "Q?"}]},
            ]
        )
    )
    with pytest.raises(ValueError, match=r"qa\.json: record 'open': the last turn must be the gpt answer"):
        qa_records(str(path))
    path.write_text("[]")
    with pytest.raises(ValueError, match="holds no records"):
        qa_records(str(path))


def test_collate_left_padding():
    features = [
        {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long)},
        {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long)},
    ]
    batch = collate(features, pad_token_id=0, padding_side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'middle'"):
        collate(features, 0, padding_side="middle")


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return make_vqa_dataset(str(tmp_path_factory.mktemp("vqa")), n_train=4, n_test=6)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generation_equals_one_by_one(tmp_path, vqa, arch):
    path = save_tiny_lvlm(arch, str(tmp_path / arch))
    processor = load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    out = tmp_path / "predictions.json"
    batched = evaluate(model, processor, vqa["test"], vqa["images"], batch_size=4, max_new_tokens=5, out=str(out))
    single = evaluate(model, processor, vqa["test"], vqa["images"], batch_size=1, max_new_tokens=5, progress=False)
    assert [p["prediction"] for p in batched.predictions] == [p["prediction"] for p in single.predictions]
    assert batched.total == 6 and all(isinstance(p["prediction"], str) for p in batched.predictions)
    saved = json.loads(out.read_text())
    assert saved["total"] == 6 and saved["predictions"][0]["id"] == "test-000004"
    assert saved["accuracy"] == batched.accuracy == batched.correct / 6
    assert evaluate(model, processor, vqa["test"], vqa["images"], limit=2, progress=False).total == 2
