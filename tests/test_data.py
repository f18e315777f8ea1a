"""vr_plugin.data on complete tiny HF-native LVLM directories (vr_plugin.tiny.save_tiny_lvlm): real tokenizers,
processors, chat templates and models, loaded back with the Auto classes."""

import importlib.util
import json
import math
import os
import pickle
import re

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

from vr_plugin import find_decoder_layers
from vr_plugin.data import (
    IGNORE_INDEX,
    Collator,
    ConversationDataset,
    calibration_batches,
    collate,
    decode_new_tokens,
    encode_conversation,
    load_conversations,
    load_processor,
    prompt_inputs,
    to_messages,
)
from vr_plugin.synthetic import make_vqa_dataset
from vr_plugin.tiny import LVLM_ARCHITECTURES, available, build_tokenizer, save_tiny_lvlm

from .common import changed, snapshot

ARCHS = [arch for arch in LVLM_ARCHITECTURES if available(arch)]
PROCESSORS = {
    "llava": "LlavaProcessor",
    "llava_next": "LlavaNextProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
}
# placeholder tokens per square image: the processor inserts them, the model's forward checks it gets as many features
IMAGE_TOKENS = {"llava": 16, "llava_next": 36, "qwen2_vl": 16, "qwen2_5_vl": 16}
END_OF_TURN = {"llava": "</s>", "llava_next": "</s>", "qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>"}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def two_turns(record_id="two", image="000000.png"):
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour are the shapes?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many shapes are there?"},
            {"from": "gpt", "value": "two circles"},
        ],
    }


def text_only(record_id="text"):
    return {
        "id": record_id,
        "conversations": [
            {"from": "system", "value": "Answer in one word."},
            {"from": "human", "value": "Are the shapes on the left or on the right?"},
            {"from": "gpt", "value": "left"},
        ],
    }


def two_images(record_id="pair"):
    return {
        "id": record_id,
        "image": ["000000.png", "000001.png"],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour are the shapes?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And here? <image>"},
            {"from": "gpt", "value": "blue"},
        ],
    }


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    paths = make_vqa_dataset(str(root), n_train=6, n_test=3, image_size=64)
    Image.new("RGB", (64, 32), (200, 30, 30)).save(os.path.join(paths["images"], "wide.png"))
    return paths


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    path = save_tiny_lvlm(arch, str(tmp_path_factory.mktemp(arch)))
    processor = load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    return arch, path, processor, model


def labelled_runs(sample):
    """The labelled token runs of a sample, as token id lists."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def load(vqa, *names):
    return [Image.open(os.path.join(vqa["images"], name)).convert("RGB") for name in names]


# ----------------------------------------------------------------------------------------------- the directories


def test_directory_loads_with_auto_classes(tiny, vqa):
    arch, path, processor, model = tiny
    assert type(processor).__name__ == PROCESSORS[arch]
    assert type(pickle.loads(pickle.dumps(processor))) is type(processor)  # DataLoader workers may pickle it
    if not arch.startswith("qwen") or HAS_TORCHVISION:  # transformers 5 makes Qwen2-VL processors on torchvision only
        assert type(AutoProcessor.from_pretrained(path)).__name__ == PROCESSORS[arch]
    config = model.config
    tokenizer = processor.tokenizer
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == processor.image_token_id == tokenizer.convert_tokens_to_ids(processor.image_token)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert len(find_decoder_layers(model).layers) == 8 and config.text_config.hidden_size == 64

    question = processor.apply_chat_template(to_messages(two_turns())[:1], add_generation_prompt=True)
    inputs = processor(text=question, images=load(vqa, "000000.png"), return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum() == IMAGE_TOKENS[arch]
    with torch.no_grad():
        logits = model(**inputs).logits  # the model checks it has as many image features as placeholders
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]


def test_tokenizer_training_is_deterministic():
    first, second = build_tokenizer("qwen2_vl"), build_tokenizer("qwen2_vl")
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


# ----------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "record", [two_turns(), text_only(), two_images()], ids=["two_turns", "text_only", "two_images"]
)
def test_labels_are_exactly_the_assistant_turns(tiny, vqa, record):
    arch, _, processor, _ = tiny
    names = record.get("image", [])
    images = load(vqa, *([names] if isinstance(names, str) else names))
    sample = encode_conversation(processor, to_messages(record), images)
    answers = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
    decoded = [processor.tokenizer.decode(run).strip() for run in labelled_runs(sample)]
    assert decoded == [answer + END_OF_TURN[arch] for answer in answers]
    assert {k: v.shape for k, v in sample.items() if v.dim() == 1} == {
        k: sample["input_ids"].shape for k, v in sample.items() if v.dim() == 1
    }
    assert (sample["input_ids"] == processor.image_token_id).sum() == IMAGE_TOKENS[arch] * len(images)


def test_template_boundary_inside_a_token_is_an_error(tiny, vqa):
    _, path, _, _ = tiny
    processor = load_processor(path)  # a fresh one: its template is changed below
    processor.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for p in m['content'] %}"
        "{% if p['type'] == 'image' %}" + processor.image_token + "{% else %}{{ p['text'] }}{% endif %}{% endfor %} "
        "{% else %}ASSISTANT: {{ m['content'][0]['text'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT: {% endif %}"  # the space belongs to the answer's first token
    )
    with pytest.raises(ValueError, match=r"record 'two'.*turn boundary '.*ASSISTANT: ' does not fall on a token"):
        ConversationDataset([two_turns()], vqa["images"], processor)[0]


def test_image_goes_where_the_marker_is(tiny, vqa):
    _, _, processor, _ = tiny
    record = {
        "id": "middle",
        "image": "000001.png",
        "conversations": [
            {"from": "human", "value": "Look at this: <image> What shape are they?"},
            {"from": "gpt", "value": "square"},
        ],
    }
    content = to_messages(record)[0]["content"]
    assert content == [
        {"type": "text", "text": "Look at this:"},
        {"type": "image"},
        {"type": "text", "text": "What shape are they?"},
    ]
    ids = encode_conversation(processor, to_messages(record), load(vqa, "000001.png"))["input_ids"].tolist()
    text = processor.tokenizer.decode(ids)
    assert text.index("this:") < text.index(processor.image_token) < text.index("What shape")


def test_record_without_marker_gets_its_image_first(tiny, vqa):
    _, _, processor, _ = tiny
    record = two_turns("no-marker")
    record["conversations"][0]["value"] = "What colour are the shapes?"
    messages = to_messages(record)
    assert messages[0]["content"][0] == {"type": "image"}
    assert messages == to_messages(two_turns())
    sample = encode_conversation(processor, messages, load(vqa, "000000.png"))
    assert (sample["input_ids"] == processor.image_token_id).any()


# ----------------------------------------------------------------------------------------------- batches


def test_collated_batch_runs_through_the_model(tiny, vqa):
    arch, _, processor, model = tiny
    wide = two_turns("wide", "wide.png")
    wide["conversations"] = [wide["conversations"][0], {"from": "gpt", "value": "They are all red."}]
    records = [two_turns(), text_only(), wide]
    dataset = ConversationDataset(records, vqa["images"], processor)
    features = [dataset[i] for i in range(3)]
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) == 3
    batch = collate(features, processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, n in enumerate(lengths):
        assert torch.equal(batch["input_ids"][row, :n], features[row]["input_ids"])
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["attention_mask"][row, n:] == 0).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
    if arch == "llava":
        assert batch["pixel_values"].shape == (2, 3, 32, 32)
    elif arch == "llava_next":  # the wide image takes the 32x64 grid: 1 + 2 patches; the square one 1 + 1, padded
        assert batch["pixel_values"].shape == (2, 3, 3, 32, 32)
        assert batch["image_sizes"].tolist() == [[64, 64], [32, 64]]
        assert (batch["pixel_values"][0, 2] == 0).all()
    else:  # both images' patches in one flat list; the wide one resized within 32*32 pixels to 16x40
        assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 10]]
        assert batch["pixel_values"].shape == (64 + 40, 3 * 2 * 4 * 4)
        assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == processor.image_token_id).long())
    with torch.no_grad():
        loss = model(**batch).loss
    assert math.isfinite(loss.item())


def test_trainer_step_on_conversation_dataset(tiny, vqa, tmp_path):
    _, _, processor, model = tiny
    dataset = ConversationDataset(vqa["train"], vqa["images"], processor)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=3,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    before = snapshot(model)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=Collator(processor))
    trainer.train()
    model.eval()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    assert any(".layers.0." in name for name in changed(before, model))


def test_truncation_never_cuts_into_the_image(tiny, vqa):
    _, _, processor, _ = tiny
    full = ConversationDataset([two_turns()], vqa["images"], processor)[0]
    after_image = int((full["input_ids"] == processor.image_token_id).nonzero().max()) + 1
    first_label = int((full["labels"] != IGNORE_INDEX).nonzero().min())
    cut = ConversationDataset([two_turns()], vqa["images"], processor, max_length=first_label + 1)[0]
    assert all(len(cut[key]) == first_label + 1 for key in cut if cut[key].dim() == 1)
    assert torch.equal(cut["input_ids"], full["input_ids"][: first_label + 1])
    assert torch.equal(cut["labels"], full["labels"][: first_label + 1])
    with pytest.raises(ValueError, match=r"record 'two'.*max_length=\d+ would cut into the image placeholder"):
        ConversationDataset([two_turns()], vqa["images"], processor, max_length=after_image - 1)[0]
    with pytest.raises(ValueError, match=r"record 'two'.*max_length=\d+ cuts off every assistant token"):
        ConversationDataset([two_turns()], vqa["images"], processor, max_length=first_label)[0]


# ------------------------------------------------------------------------------------- generation, calibration


def test_prompt_inputs_match_training_and_generate(tiny, vqa):
    arch, _, processor, model = tiny
    record = load_conversations(vqa["test"])[0]
    inputs = prompt_inputs(processor, record, image_folder=vqa["images"])
    sample = encode_conversation(processor, to_messages(record), load(vqa, record["image"]))
    first_label = int((sample["labels"] != IGNORE_INDEX).nonzero().min())
    assert torch.equal(inputs["input_ids"][0], sample["input_ids"][:first_label])  # the prompt trained on
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    new = decode_new_tokens(processor, inputs, output)
    assert len(new) == 1 and isinstance(new[0], str)

    question = prompt_inputs(processor, "What colour are the shapes?", image=load(vqa, record["image"])[0])
    assert (question["input_ids"] == processor.image_token_id).sum() == IMAGE_TOKENS[arch]
    assert model.generate(**question, max_new_tokens=2, do_sample=False).shape[1] > question["input_ids"].shape[1]
    # a two-turn record is prompted up to its last question, with both turns before it
    prompt = processor.tokenizer.decode(
        prompt_inputs(processor, two_turns(), image_folder=vqa["images"])["input_ids"][0]
    )
    assert "red" in prompt and "How many shapes are there?" in prompt and "two circles" not in prompt
    # an image given for a text-only record goes first in its first human turn
    given = prompt_inputs(processor, text_only(), image=os.path.join(vqa["images"], "000002.png"))
    assert (given["input_ids"] == processor.image_token_id).sum() == IMAGE_TOKENS[arch]


def test_calibration_batches(tiny, vqa):
    _, _, processor, model = tiny
    batches = list(calibration_batches(processor, vqa["calibration"], vqa["images"], batch_size=2))
    assert [len(b["input_ids"]) for b in batches] == [2, 1]
    assert all("labels" not in b for b in batches)
    prompt = processor.tokenizer.decode(batches[0]["input_ids"][0])
    assert "Please describe this image in detail." in prompt
    answer = load_conversations(vqa["calibration"])[0]["conversations"][1]["value"]
    assert answer not in prompt
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()
    assert len(list(calibration_batches(processor, vqa["calibration"], vqa["images"], limit=1))) == 1


def test_calibration_merges_the_human_turns(tiny, vqa, tmp_path):
    arch, _, processor, _ = tiny
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps([two_images(), text_only()]))
    batch = next(calibration_batches(processor, str(path), vqa["images"]))
    first = processor.tokenizer.decode(batch["input_ids"][0])
    assert "What colour are the shapes?" in first and "And here?" in first
    assert "red" not in first and "blue" not in first
    assert (batch["input_ids"][0] == processor.image_token_id).sum() == 2 * IMAGE_TOKENS[arch]
    assert (batch["input_ids"][1] == processor.image_token_id).sum() == 0
    assert "Answer in one word." in processor.tokenizer.decode(batch["input_ids"][1])


# ----------------------------------------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    "turns, message",
    [
        (
            [{"from": "human", "value": "<image>\nHi"}, {"from": "bot", "value": "x"}],
            r"conversations\[1\]\.from is 'bot'; accepted: assistant, gpt, human, system, user",
        ),
        (
            [{"from": "gpt", "value": "x"}, {"from": "human", "value": "<image>\nHi"}],
            r"conversations\[0\]\.from is 'gpt', expected a user turn: conversations must start with a human turn",
        ),
        (
            [{"from": "human", "value": "<image>\nHi"}, {"from": "human", "value": "again"}],
            r"conversations\[1\].*must alternate human/gpt",
        ),
        (
            [{"from": "human", "value": "<image>\nHi"}, {"from": "system", "value": "x"}],
            r"conversations\[1\]\.from is 'system'; a system turn may only come first",
        ),
        (
            [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}],
            r"the human turns have 2 <image> marker\(s\) but field 'image' names 1 image",
        ),
        (
            [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "<image>"}],
            r"conversations\[1\]\.value has an <image> marker",
        ),
        ([{"from": "human", "value": None}], r"conversations\[0\] must be"),
        ([], r"field 'conversations' must be a non-empty list"),
    ],
    ids=["unknown-role", "gpt-first", "human-twice", "late-system", "markers", "marker-in-answer", "no-value", "empty"],
)
def test_bad_records_name_the_record_and_field(turns, message):
    with pytest.raises(ValueError, match=r"record 'bad': " + message):
        to_messages({"id": "bad", "image": "000000.png", "conversations": turns})


def test_bad_files_and_images(tmp_path, vqa, tiny):
    _, _, processor, _ = tiny
    path = tmp_path / "data.json"
    path.write_text(json.dumps([two_turns(), {"conversations": [{"from": "gpt", "value": "x"}]}]))
    with pytest.raises(ValueError, match=re.escape(f"{path}: record #1: conversations[0].from is 'gpt'")):
        load_conversations(str(path))
    path.write_text(json.dumps({"id": "not a list"}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_conversations(str(path))
    path.write_text("[{")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON")):
        load_conversations(str(path))
    with pytest.raises(
        FileNotFoundError, match=r"record 'gone': field 'image' names '.*missing\.png', which does not exist"
    ):
        ConversationDataset([two_turns("gone", "missing.png")], vqa["images"], processor)
    with pytest.raises(
        ValueError, match=r"record 'marker': the human turns have 1 <image> marker\(s\) but field 'image' names 0"
    ):
        ConversationDataset([dict(two_turns("marker"), image=None)], vqa["images"], processor)
    unanswered = {"id": "open", "conversations": [{"from": "human", "value": "Hi"}]}
    with pytest.raises(ValueError, match="record 'open': field 'conversations' has no gpt turn"):
        ConversationDataset([unanswered], vqa["images"], processor)


def test_qwen_directory_records_the_real_processor_class(tiny):
    arch, path, processor, _ = tiny
    with open(os.path.join(path, "processor_config.json")) as handle:
        config = json.load(handle)
    assert config["processor_class"] == PROCESSORS[arch]
    if arch.startswith("qwen"):  # what AutoProcessor needs where torchvision is installed
        assert config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
