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
    as_sample,
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
from vr_plugin.tiny import INTERNVL_IMAGE_TOKENS, LVLM_ARCHITECTURES, available, build_tokenizer, save_tiny_lvlm

from .common import changed, snapshot

ARCHS = [arch for arch in LVLM_ARCHITECTURES if available(arch)]
PROCESSORS = {
    "llava": "LlavaProcessor",
    "llava_next": "LlavaNextProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "gemma3": "Gemma3Processor",
    "mllama": "MllamaProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen3_vl_moe": "Qwen3VLProcessor",
    "internvl": "InternVLProcessor",
    "glm4v": "Glm4vProcessor",
    "aya_vision": "AyaVisionProcessor",
}
# the placeholder token the model counts image features for (its config's image_token_id)
PLACEHOLDERS = {
    "llava": "<image>",
    "llava_next": "<image>",
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "gemma3": "<image_soft_token>",
    "mllama": "<|image|>",
    "qwen3_vl": "<|image_pad|>",
    "qwen3_vl_moe": "<|image_pad|>",
    "internvl": "<IMG_CONTEXT>",
    "glm4v": "<|image|>",
    "aya_vision": "<|IMG_PATCH|>",
}
# processor.image_token (what the chat template writes for an image) where it is not the placeholder: Gemma 3's
# <start_of_image> (its processor's image_token_id too), Aya Vision's "<image>", a text marker outside the vocabulary
IMAGE_MARKERS = {"gemma3": "<start_of_image>", "aya_vision": "<image>"}
# placeholder tokens per square image: the processor inserts them, the model's forward checks it gets as many features
IMAGE_TOKENS = {
    "llava": 16,
    "llava_next": 36,
    "qwen2_vl": 16,
    "qwen2_5_vl": 16,
    "gemma3": 4,
    "mllama": 1,
    "qwen3_vl": 16,
    "qwen3_vl_moe": 16,
    "internvl": INTERNVL_IMAGE_TOKENS,
    "glm4v": 16,
    "aya_vision": 4,
}
END_OF_TURN = {
    "llava": "</s>",
    "llava_next": "</s>",
    "qwen2_vl": "<|im_end|>",
    "qwen2_5_vl": "<|im_end|>",
    "gemma3": "<end_of_turn>",
    "mllama": "<|eot_id|>",
    "qwen3_vl": "<|im_end|>",
    "qwen3_vl_moe": "<|im_end|>",
    "internvl": "<|im_end|>",
    "glm4v": "",  # GLM-4.1V writes nothing after an answer: the next role token ends it
    "aya_vision": "<|END_OF_TURN_TOKEN|>",
}
# the families with video, and the video processor their directories record for AutoProcessor
VIDEO_PROCESSORS = {
    "qwen2_vl": "Qwen2VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
    "qwen3_vl_moe": "Qwen3VLVideoProcessor",
    "internvl": "InternVLVideoProcessor",
    "glm4v": "Glm4vVideoProcessor",
}
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


def image_id(arch, processor):
    """The id of ``arch``'s image placeholder token (not always processor.image_token_id: Gemma 3's is
    <start_of_image>'s)."""
    return processor.tokenizer.convert_tokens_to_ids(PLACEHOLDERS[arch])


def load(vqa, *names):
    return [Image.open(os.path.join(vqa["images"], name)).convert("RGB") for name in names]


# ----------------------------------------------------------------------------------------------- the directories


def test_directory_loads_with_auto_classes(tiny, vqa):
    arch, path, processor, model = tiny
    assert type(processor).__name__ == PROCESSORS[arch]
    assert type(pickle.loads(pickle.dumps(processor))) is type(processor)  # DataLoader workers may pickle it
    if arch not in VIDEO_PROCESSORS or HAS_TORCHVISION:  # transformers 5 makes their video processors on torchvision
        assert type(AutoProcessor.from_pretrained(path)).__name__ == PROCESSORS[arch]
    config = model.config
    tokenizer = processor.tokenizer
    assert config.get_text_config().vocab_size == len(tokenizer)
    assert config.image_token_id == image_id(arch, processor)
    assert processor.image_token == IMAGE_MARKERS.get(arch, PLACEHOLDERS[arch])
    if arch == "aya_vision":  # "<image>" is text the processor replaces; its image_token_id is the placeholder's
        assert processor.image_token not in tokenizer.get_vocab() and processor.image_token_id == config.image_token_id
    elif arch == "gemma3":  # image_token_id is <start_of_image>'s, the tokenizer's image_token the placeholder
        assert processor.image_token_id == tokenizer.convert_tokens_to_ids(processor.image_token)
        assert tokenizer.image_token == PLACEHOLDERS[arch] and tokenizer.image_token_id == config.image_token_id
    else:
        assert (
            config.image_token_id == processor.image_token_id == tokenizer.convert_tokens_to_ids(processor.image_token)
        )
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert len(find_decoder_layers(model).layers) == 8 and config.get_text_config().hidden_size == 64

    question = processor.apply_chat_template(to_messages(two_turns())[:1], add_generation_prompt=True)
    inputs = processor(text=question, images=load(vqa, "000000.png"), return_tensors="pt")
    assert (inputs["input_ids"] == image_id(arch, processor)).sum() == IMAGE_TOKENS[arch]
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
    assert (sample["input_ids"] == image_id(arch, processor)).sum() == IMAGE_TOKENS[arch] * len(images)


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
    arch, _, processor, _ = tiny
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
    assert text.index("this:") < text.index(PLACEHOLDERS[arch]) < text.index("What shape")


def test_record_without_marker_gets_its_image_first(tiny, vqa):
    arch, _, processor, _ = tiny
    record = two_turns("no-marker")
    record["conversations"][0]["value"] = "What colour are the shapes?"
    messages = to_messages(record)
    assert messages[0]["content"][0] == {"type": "image"}
    assert messages == to_messages(two_turns())
    sample = encode_conversation(processor, messages, load(vqa, "000000.png"))
    assert (sample["input_ids"] == image_id(arch, processor)).any()


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
    if arch in ("llava", "gemma3", "internvl", "aya_vision"):  # one 32x32 tile an image
        assert batch["pixel_values"].shape == (2, 3, 32, 32)
        if arch == "gemma3":
            assert torch.equal(batch["token_type_ids"], (batch["input_ids"] == image_id(arch, processor)).long())
    elif arch == "mllama":  # a row per sample, the text-only one all padding; the wide image takes 2 tiles
        assert batch["pixel_values"].shape == (3, 1, 2, 3, 32, 32)
        assert batch["aspect_ratio_ids"].tolist() == [[1], [0], [2]]
        assert batch["aspect_ratio_mask"].tolist() == [[[1, 0]], [[1, 0]], [[1, 1]]]  # as MllamaProcessor pads
        assert (batch["pixel_values"][1] == 0).all() and (batch["pixel_values"][0, :, 1] == 0).all()
        mask = batch["cross_attention_mask"]
        assert mask.shape == (3, max(lengths), 1, 2) and (mask[1] == 0).all()
        for row, n in enumerate(lengths):
            assert torch.equal(mask[row, :n], features[row].get("cross_attention_mask", mask[1, :n]))
            assert (mask[row, n:] == 0).all()
    elif arch == "llava_next":  # the wide image takes the 32x64 grid: 1 + 2 patches; the square one 1 + 1, padded
        assert batch["pixel_values"].shape == (2, 3, 3, 32, 32)
        assert batch["image_sizes"].tolist() == [[64, 64], [32, 64]]
        assert (batch["pixel_values"][0, 2] == 0).all()
    else:  # both images' patches in one flat list; the wide one resized within 32*32 pixels to 16x40
        assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 10]]
        assert batch["pixel_values"].shape == (64 + 40, 3 * 2 * 4 * 4)
        assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == image_id(arch, processor)).long())
    with torch.no_grad():
        output = model(**batch)
        alone = model(**collate(features[1:2], processor.tokenizer.pad_token_id)).logits[0]
    assert math.isfinite(output.loss.item())
    if arch != "mllama":  # the text-only sample reads the same next to image samples as alone
        assert torch.allclose(output.logits[1, : lengths[1]], alone, atol=1e-4)
    else:  # Mllama's cross-attention layers run for it (attending to the padding image, as for MllamaProcessor's
        # batches and for the text before an image) where alone they are skipped
        assert torch.isfinite(output.logits[1]).all() and torch.isfinite(alone).all()


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
    arch, _, processor, _ = tiny
    full = ConversationDataset([two_turns()], vqa["images"], processor)[0]
    placeholders = (full["input_ids"] == image_id(arch, processor)).nonzero()
    after_image = int(placeholders.max()) + 1
    first_label = int((full["labels"] != IGNORE_INDEX).nonzero().min())
    cut = ConversationDataset([two_turns()], vqa["images"], processor, max_length=first_label + 1)[0]
    assert all(len(cut[key]) == first_label + 1 for key in cut if cut[key].dim() == 1)
    if arch == "mllama":  # its cross_attention_mask is token-level too
        assert torch.equal(cut["cross_attention_mask"], full["cross_attention_mask"][: first_label + 1])
    assert torch.equal(cut["input_ids"], full["input_ids"][: first_label + 1])
    assert torch.equal(cut["labels"], full["labels"][: first_label + 1])
    with pytest.raises(ValueError, match=r"record 'two'.*max_length=\d+ would cut into the image placeholder"):
        ConversationDataset([two_turns()], vqa["images"], processor, max_length=after_image - 1)[0]
    # nor just after the first placeholder, nor (Gemma 3) just after <start_of_image>, its processor's image_token_id
    boi = int((full["input_ids"] == processor.image_token_id).nonzero().min())
    for max_length in {int(placeholders.min()) + 1, boi + 1} - {after_image}:
        with pytest.raises(ValueError, match=r"record 'two'.*max_length=\d+ would cut into the image placeholder"):
            ConversationDataset([two_turns()], vqa["images"], processor, max_length=max_length)[0]
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
    assert (question["input_ids"] == image_id(arch, processor)).sum() == IMAGE_TOKENS[arch]
    assert model.generate(**question, max_new_tokens=2, do_sample=False).shape[1] > question["input_ids"].shape[1]
    # a two-turn record is prompted up to its last question, with both turns before it
    prompt = processor.tokenizer.decode(
        prompt_inputs(processor, two_turns(), image_folder=vqa["images"])["input_ids"][0]
    )
    assert "red" in prompt and "How many shapes are there?" in prompt and "two circles" not in prompt
    # an image given for a text-only record goes first in its first human turn
    given = prompt_inputs(processor, text_only(), image=os.path.join(vqa["images"], "000002.png"))
    assert (given["input_ids"] == image_id(arch, processor)).sum() == IMAGE_TOKENS[arch]


def test_left_padded_batch_generates_as_one_at_a_time(tiny, vqa):
    """Batched generation (left padding, as evaluation does) of prompts of different lengths with one, two and no
    images; Mllama's prompts have one image each (see below)."""
    arch, _, processor, model = tiny
    pad = processor.tokenizer.pad_token_id
    prompts = [
        prompt_inputs(processor, two_turns(), image_folder=vqa["images"]),
        prompt_inputs(processor, "What colour are the shapes?", image=load(vqa, "wide.png")[0]),
    ]
    others = [prompt_inputs(processor, record, image_folder=vqa["images"]) for record in (two_images(), text_only())]
    if arch != "mllama":  # see the end
        prompts += others
    assert len({p["input_ids"].shape[1] for p in prompts}) == len(prompts)
    batch = collate([as_sample(p) for p in prompts], pad, padding_side="left")
    length = batch["input_ids"].shape[1]
    for row, prompt in enumerate(prompts):
        start = length - prompt["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, start:], prompt["input_ids"][0])
        assert (batch["input_ids"][row, :start] == pad).all() and (batch["attention_mask"][row, :start] == 0).all()
        if "cross_attention_mask" in batch:  # Mllama's is padded along the sequence on the same side
            assert torch.equal(batch["cross_attention_mask"][row, start:], prompt["cross_attention_mask"][0])
            assert (batch["cross_attention_mask"][row, :start] == 0).all()
    batched = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=pad)[:, length:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=pad)
        alone = alone[0, prompt["input_ids"].shape[1] :]
        assert batched[row, : len(alone)].tolist() == alone.tolist()
        assert (batched[row, len(alone) :] == pad).all()
    if arch == "mllama":
        # HF Mllama's text rows that see no image (those before a prompt's first image, all of a text-only prompt's)
        # attend evenly to every image slot of the batch: a padding image (a sample with fewer images) changes them
        mixed = collate([as_sample(p) for p in prompts + others], pad, padding_side="left")
        assert mixed["pixel_values"].shape[:3] == (4, 2, 2) and (mixed["cross_attention_mask"][3] == 0).all()
        assert model.generate(**mixed, max_new_tokens=2, do_sample=False, pad_token_id=pad).shape[0] == 4


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
    assert (batch["input_ids"][0] == image_id(arch, processor)).sum() == 2 * IMAGE_TOKENS[arch]
    assert (batch["input_ids"][1] == image_id(arch, processor)).sum() == 0
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


def test_directory_records_the_real_processor_class(tiny):
    arch, path, processor, _ = tiny
    with open(os.path.join(path, "processor_config.json")) as handle:
        config = json.load(handle)
    assert config["processor_class"] == PROCESSORS[arch]
    if arch in VIDEO_PROCESSORS:  # what AutoProcessor needs where torchvision is installed
        assert config["video_processor"]["video_processor_type"] == VIDEO_PROCESSORS[arch]
    if arch == "internvl":
        assert config["image_seq_length"] == INTERNVL_IMAGE_TOKENS


def test_processor_survives_save_and_load(tiny, vqa, tmp_path):
    """What training saves beside the model loads back as the same processor (an image-only one keeps its other
    arguments: InternVL's image_seq_length)."""
    arch, _, processor, _ = tiny
    processor.save_pretrained(str(tmp_path))
    again = load_processor(str(tmp_path))
    assert type(again).__name__ == PROCESSORS[arch]
    assert getattr(again, "image_seq_length", None) == getattr(processor, "image_seq_length", None)
    if arch == "internvl":
        assert again.image_seq_length == INTERNVL_IMAGE_TOKENS
    record = load_conversations(vqa["test"])[0]
    first = prompt_inputs(processor, record, image_folder=vqa["images"])
    second = prompt_inputs(again, record, image_folder=vqa["images"])
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
