"""Input validation before any weights load, and result files written atomically (no model weights needed)."""

import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vr_plugin import data as data_module
from vr_plugin import select_layers
from vr_plugin.data import ConversationDataset, calibration_batches, load_conversations, validate_conversations
from vr_plugin.evaluate import EvalReport, qa_records, save_predictions
from vr_plugin.io import write_json
from vr_plugin.layer_map import _config_path, layer_map
from vr_plugin.score import ScoreReport, load_scores, save_scores
from vr_plugin.synthetic import make_vqa_dataset

HINT = "write it with vr-plugin score"


@pytest.fixture
def vqa(tmp_path):
    return make_vqa_dataset(str(tmp_path / "vqa"), n_train=6, n_test=2)


def _image(vqa: dict, index: int) -> str:
    return os.path.join(vqa["images"], f"{index:06d}.png")


def _write(path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def _leftovers(directory) -> list:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


# ----------------------------------------------------------------------------------------- conversations + images


def test_a_good_file_is_kept_whole(vqa):
    records, skipped = validate_conversations(vqa["train"], vqa["images"])
    assert skipped == 0
    assert records == load_conversations(vqa["train"])


def test_empty_files_are_refused_by_name(tmp_path):
    empty = _write(tmp_path / "empty.json", [])
    with pytest.raises(ValueError, match=re.escape(f"conversation file {empty} holds no records")):
        validate_conversations(empty, None)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match=re.escape(f"conversation file {blank} holds no records")):
        validate_conversations(str(blank), None)
    nothing = tmp_path / "nothing.json"
    nothing.write_text("")
    with pytest.raises(ValueError, match=re.escape(f"conversation file {nothing} is empty")):
        validate_conversations(str(nothing), None)


def test_missing_file_and_folder(tmp_path, vqa):
    with pytest.raises(FileNotFoundError, match=re.escape(f"conversation file '{tmp_path}/gone.json' does not exist")):
        validate_conversations(str(tmp_path / "gone.json"), vqa["images"])
    with pytest.raises(FileNotFoundError, match=re.escape(f"image folder '{tmp_path}/imgs' does not exist")):
        validate_conversations(vqa["train"], str(tmp_path / "imgs"))


def test_bad_record_structure_is_named(tmp_path, vqa):
    records = load_conversations(vqa["train"])
    records[2]["conversations"][0]["from"] = "robot"
    path = _write(tmp_path / "bad.json", records)
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 'train-000002': conversations[0].from is 'robot'")):
        validate_conversations(path, vqa["images"])


def test_corrupt_image_names_record_and_image(vqa):
    with open(_image(vqa, 3), "wb") as handle:
        handle.write(b"not a png at all")
    expected = (
        f"record 3 (id 'train-000003') of {vqa['train']}: image '000003.png' is not a readable image "
        "(cannot identify image file)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        validate_conversations(vqa["train"], vqa["images"])


def test_truncated_image_is_unreadable(vqa):
    with open(_image(vqa, 1), "rb") as handle:
        content = handle.read()
    with open(_image(vqa, 1), "wb") as handle:
        handle.write(content[: len(content) // 2])
    with pytest.raises(ValueError, match=re.escape("record 1 (id 'train-000001') of ") + ".*is not a readable image"):
        validate_conversations(vqa["train"], vqa["images"])


def test_missing_image_names_record_image_and_folder(vqa):
    os.remove(_image(vqa, 2))
    expected = f"record 2 (id 'train-000002') of {vqa['train']}: image '000002.png' does not exist"
    with pytest.raises(FileNotFoundError, match=re.escape(expected) + f".*image folder '{vqa['images']}'"):
        validate_conversations(vqa["train"], vqa["images"])


def test_skip_bad_images_drops_and_counts(vqa):
    os.remove(_image(vqa, 2))
    with open(_image(vqa, 4), "wb") as handle:
        handle.write(b"")
    records, skipped = validate_conversations(vqa["train"], vqa["images"], skip_bad_images=True)
    assert skipped == 2
    assert [r["id"] for r in records] == ["train-000000", "train-000001", "train-000003", "train-000005"]


def test_every_record_skipped_is_an_error(tmp_path, vqa):
    empty_folder = tmp_path / "elsewhere"
    empty_folder.mkdir()
    with pytest.raises(ValueError, match=r"all 6 records of .*train\.json have a missing or unreadable image") as info:
        validate_conversations(vqa["train"], str(empty_folder), skip_bad_images=True)
    assert "record 0 (id 'train-000000')" in str(info.value)


def test_jsonl_records_are_named_with_their_line(tmp_path, vqa):
    records = load_conversations(vqa["train"])
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(records[0]), "", json.dumps(records[1])]) + "\n")
    os.remove(_image(vqa, 1))
    with pytest.raises(FileNotFoundError, match=re.escape(f"record 1 (id 'train-000001') of {path} (line 3): image")):
        validate_conversations(str(path), vqa["images"])


# ----------------------------------------------------------------------------------------------------- .jsonl


def test_jsonl_syntax_error_names_its_line(tmp_path, vqa):
    good = [json.dumps(r) for r in load_conversations(vqa["train"])[:4]]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([good[0], "", good[1], good[2], "   ", good[3], '{"id": "x" "image": 1}']) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path} line 7: not valid JSON (Expecting ',' delimiter")):
        load_conversations(str(path))


def test_jsonl_blank_lines_are_allowed_and_bad_records_named_by_line(tmp_path, vqa):
    records = load_conversations(vqa["train"])[:3]
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n" + "\n\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_conversations(str(path)) == records
    records[1]["conversations"] = []
    path.write_text("\n\n" + "\n\n".join(json.dumps(r) for r in records) + "\n\n")
    with pytest.raises(ValueError, match=re.escape(f"{path} line 5: record 'train-000001': field 'conversations'")):
        load_conversations(str(path))


# ----------------------------------------------------------------------------------- validated records passed on


class _FakeProcessor:
    """Just enough of a processor for calibration_batches: one token per character, one pixel row per image."""

    pad_token_id = 0
    eos_token_id = 0
    bos_token = None

    def apply_chat_template(self, messages: list, add_generation_prompt: bool, tokenize: bool) -> str:
        return "".join(part.get("text", "#") for m in messages for part in m["content"])

    def __call__(self, text: list, images: list, return_tensors: str, add_special_tokens: bool):
        ids = torch.ones(1, len(text[0]), dtype=torch.long)
        encoded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if images:
            encoded["pixel_values"] = torch.zeros(len(images), 3, 2, 2)
        return SimpleNamespace(data=encoded)


def _no_reading(monkeypatch) -> None:
    def refuse(path: str) -> list:
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(data_module, "load_conversations", refuse)
    monkeypatch.setattr("vr_plugin.evaluate.load_conversations", refuse)


def test_validated_records_are_not_read_again(monkeypatch, vqa):
    records, _ = validate_conversations(vqa["test"], vqa["images"])
    _no_reading(monkeypatch)
    batches = list(calibration_batches(_FakeProcessor(), vqa["test"], vqa["images"], batch_size=1, records=records))
    assert len(batches) == 2 and batches[0]["pixel_values"].shape[0] == 1
    limited = calibration_batches(_FakeProcessor(), vqa["test"], vqa["images"], limit=1, records=records)
    assert len(list(limited)) == 1
    assert len(ConversationDataset(records, vqa["images"], _FakeProcessor(), source=vqa["test"])) == 2
    assert [item[2] for item in qa_records(records, source=vqa["test"])] == [
        r["conversations"][-1]["value"] for r in records
    ]


def test_source_names_the_file_of_validated_records(vqa):
    records, _ = validate_conversations(vqa["test"], vqa["images"])
    records[1]["conversations"] = records[1]["conversations"][:1]
    with pytest.raises(
        ValueError, match=re.escape(f"{vqa['test']}: record 'test-000007': field 'conversations' has no gpt")
    ):
        ConversationDataset(records, vqa["images"], _FakeProcessor(), source=vqa["test"])
    with pytest.raises(ValueError, match=re.escape(f"{vqa['test']}: record 'test-000007': the last turn must be")):
        qa_records(records, source=vqa["test"])


# ------------------------------------------------------------------------------------------------ scores file


def test_scores_file_messages(tmp_path):
    missing = str(tmp_path / "scores.json")
    with pytest.raises(FileNotFoundError, match=re.escape(f"scores file {missing!r} does not exist; {HINT}")):
        load_scores(missing)
    path = tmp_path / "scores.json"
    path.write_text("  \n")
    with pytest.raises(ValueError, match=re.escape(f"scores file {str(path)!r} is empty; {HINT}")):
        load_scores(str(path))
    path.write_text("metric: angular")
    with pytest.raises(ValueError, match=re.escape(f"scores file {str(path)!r} is not JSON (Expecting value")) as info:
        load_scores(str(path))
    assert HINT in str(info.value)
    path.write_text('{"scores": [1, 2]}')
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a vr_plugin scores file")):
        load_scores(str(path))


def test_scores_round_trip_and_atomic_save(tmp_path):
    path = str(tmp_path / "runs" / "scores.json")  # the parent directory is created
    report = ScoreReport("angular", {0: 0.5, 1: 0.25}, 2, model="m", data="d")
    save_scores(path, report)
    before = open(path).read()
    assert load_scores(path).scores == {0: 0.5, 1: 0.25}
    assert json.loads(before)["metric"] == "angular" and before.startswith('{\n  "metric"')  # indent 2, as before
    report.extra = {"bad": object()}
    with pytest.raises(TypeError):
        save_scores(path, report)
    assert open(path).read() == before
    assert _leftovers(tmp_path / "runs") == []


# ------------------------------------------------------------------------------------------- integer indices


def test_select_layers_takes_numpy_and_torch_integers():
    assert select_layers([np.int64(5), np.int32(1)], 8) == [1, 5]
    assert select_layers((torch.tensor(2), torch.tensor(-1)), 8) == [2, 7]
    assert select_layers(np.array([0, 3]), 8) == [0, 3]
    assert select_layers(torch.tensor([4, 6]), 8) == [4, 6]
    assert select_layers("uniform_0.25", np.int64(32)) == [1, 5, 9, 13, 19, 23, 27, 31]


@pytest.mark.parametrize(
    "bad", [[True], [np.bool_(True)], [torch.tensor(True)], [1.0], [torch.tensor(1.0)], ["1"]], ids=repr
)
def test_select_layers_still_refuses_bools_and_non_integers(bad):
    with pytest.raises(ValueError, match=re.escape(f"a list spec must contain integers only, got {bad[0]!r}")):
        select_layers(bad, 8)


def test_prune_outside_region_takes_numpy_indices():
    from vr_plugin import find_decoder_layers, prune_outside_region
    from vr_plugin.tiny import build_model

    model = build_model("llava", num_layers=4)
    assert prune_outside_region(model, region="none", remove=[np.int64(2)]).removed == [2]
    assert len(find_decoder_layers(model).layers) == 3


# ------------------------------------------------------------------------------------------ adapter base model


def _adapter(tmp_path, base: str) -> str:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    return str(adapter)


@pytest.mark.parametrize("base", ["/nowhere/llava-base", "./gone-base", "../gone-base", "gone-base", "a/b/c"])
def test_adapter_with_a_missing_local_base(tmp_path, base):
    adapter = _adapter(tmp_path, base)
    expected = f"adapter {adapter} names base model {base!r} (base_model_name_or_path), which does not exist here; "
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        _config_path(adapter)
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        layer_map(adapter)


def test_adapter_base_that_exists_or_looks_like_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _config_path(_adapter(tmp_path, "llava-hf/llava-1.5-7b-hf")) == "llava-hf/llava-1.5-7b-hf"
    (tmp_path / "base").mkdir()
    os.rename(tmp_path / "adapter", tmp_path / "old")
    assert _config_path(_adapter(tmp_path, str(tmp_path / "base"))) == str(tmp_path / "base")
    os.rename(tmp_path / "adapter", tmp_path / "old2")
    (tmp_path / "runs").mkdir()  # runs/base-model next to a runs/ directory is a local path, not a hub id
    with pytest.raises(FileNotFoundError, match="names base model 'runs/base-model'"):
        _config_path(_adapter(tmp_path, "runs/base-model"))


# --------------------------------------------------------------------------------------------- atomic writes


def test_write_json_matches_json_dump_and_creates_parents(tmp_path):
    data = {"b": [1, 2.5, None], "a": "é"}
    path = write_json(str(tmp_path / "x" / "y" / "out.json"), data, indent=1)
    assert open(path, encoding="utf-8").read() == json.dumps(data, indent=1)
    reference = tmp_path / "reference.json"
    reference.write_text("{}")
    assert os.stat(path).st_mode & 0o777 == os.stat(reference).st_mode & 0o777  # the umask's, not mkstemp's 0600


def test_failed_write_leaves_previous_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "result.json")
    write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"ok": 2, "bad": object()})
    assert json.load(open(path)) == {"ok": 1}
    assert _leftovers(tmp_path) == []
    with pytest.raises(TypeError):
        write_json(str(tmp_path / "new.json"), [object()])
    assert sorted(os.listdir(tmp_path)) == ["result.json"]


def test_save_predictions_is_atomic_and_unchanged(tmp_path):
    path = str(tmp_path / "predictions.json")
    prediction = {"id": "q", "question": "?", "answer": "a", "prediction": "a", "correct": True, "kind": "exact"}
    report = EvalReport(1.0, 1, 1, [prediction], model="m", data="qa.json", seconds=0.5)
    save_predictions(path, report)
    before = open(path).read()
    assert json.loads(before)["predictions"] == [prediction] and before.startswith('{\n "accuracy"')  # indent 1
    report.predictions = [{"bad": object()}]
    with pytest.raises(TypeError):
        save_predictions(path, report)
    assert open(path).read() == before
    assert _leftovers(tmp_path) == []
