"""Outputs never clobber a model: refused overwrites, output = input, swaps on replace, unfinished directories,
corrupt weight files (vr_plugin.outputs through the vr-plugin command)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from vr_plugin.outputs import COMPLETE, INCOMPLETE
from vr_plugin.synthetic import make_vqa_dataset
from vr_plugin.tiny import save_tiny_lvlm

from .test_cli import cli, fails


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vqa_dataset(str(tmp_path_factory.mktemp("vqa")), n_train=6, n_test=3)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_tiny_lvlm("llava", str(tmp_path_factory.mktemp("llava") / "model"))


def _train(model, data, out, *extra):
    return ["train", "--model", model, "--data", data["train"], "--images", data["images"], "--output", out,
            "--max_steps", 1, "--per_device_train_batch_size", 2, "--save_strategy", "no", *extra]  # fmt: skip


def _listing(path):
    return {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))}


def test_output_equal_to_input_is_refused(capsys, tmp_path, llava, data):
    before = _listing(llava)
    fails(capsys, *_train(llava, data, llava), match=f"the output directory '{llava}' is the input model")
    fails(capsys, *_train(llava, data, llava, "--overwrite_output_dir"), match="is the input model")
    fails(capsys, "prune", "--model", llava, "--layers", "2", "--output", llava, "--overwrite_output_dir",
          match="is the input model")  # fmt: skip
    assert _listing(llava) == before


def test_non_empty_output_needs_overwrite_and_is_swapped_whole(capsys, tmp_path, llava, data):
    out = tmp_path / "run"
    assert cli(capsys, *_train(llava, data, out))[0] == 0
    assert (out / COMPLETE).is_file() and not (out / INCOMPLETE).exists()
    first = load_file(out / "model.safetensors")
    fails(capsys, *_train(llava, data, out), match=f"the output directory '{out}' is not empty (it holds ")
    (out / "stale.txt").write_text("from before")
    code, stdout, err = cli(capsys, *_train(llava, data, out, "--overwrite_output_dir", "--learning_rate", 0.5))
    assert code == 0, err
    assert f"saved to {out}" in stdout and not (out / "stale.txt").exists()  # a fresh directory swapped in
    assert not any(p.name.startswith("run.vr-") for p in tmp_path.iterdir())
    second = load_file(out / "model.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_failed_replace_leaves_the_previous_contents(capsys, tmp_path, llava, data, monkeypatch):
    out = tmp_path / "run"
    assert cli(capsys, *_train(llava, data, out))[0] == 0
    before = _listing(out)

    def crash(config, args, **kwargs):
        with open(os.path.join(args.output_dir, "model.safetensors"), "wb") as handle:
            handle.write(b"half a model")
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr("vr_plugin.training.train", crash)
    with pytest.raises(RuntimeError, match="killed mid-training"):
        cli(capsys, *_train(llava, data, out, "--overwrite_output_dir"))
    assert _listing(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_unfinished_directory_is_refused_by_eval_score_and_prune(capsys, tmp_path, llava, data, monkeypatch):
    out = tmp_path / "run"

    def crash(config, args, **kwargs):
        from transformers import AutoModelForImageTextToText

        AutoModelForImageTextToText.from_pretrained(llava).save_pretrained(args.output_dir)  # looks complete
        raise RuntimeError("killed before the end")

    monkeypatch.setattr("vr_plugin.training.train", crash)
    with pytest.raises(RuntimeError):
        cli(capsys, *_train(llava, data, out))
    assert json.loads((out / INCOMPLETE).read_text())["command"] == "vr-plugin train"
    unfinished = f"'{out}' is unfinished: vr-plugin train began writing it and never completed"
    fails(capsys, "eval", "--model", out, "--data", data["test"], "--images", data["images"], match=unfinished)
    fails(capsys, "score", "--model", out, "--data", data["calibration"], "--images", data["images"],
          "--out", tmp_path / "s.json", match=unfinished)  # fmt: skip
    fails(capsys, "prune", "--model", out, "--layers", "2", "--output", tmp_path / "p", match=unfinished)


def test_prune_onto_a_sharded_model_leaves_no_stale_shards(capsys, tmp_path, llava):
    from transformers import AutoModelForImageTextToText

    sharded = tmp_path / "sharded"
    AutoModelForImageTextToText.from_pretrained(llava).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    fails(capsys, "prune", "--model", llava, "--layers", "2", "--output", sharded, match="is not empty")
    code, _, err = cli(
        capsys, "prune", "--model", llava, "--layers", "2", "--output", sharded, "--overwrite_output_dir"
    )
    assert code == 0, err
    names = set(os.listdir(sharded))
    assert "model.safetensors" in names and not any(n.startswith("model-0") for n in names), names
    assert "model.safetensors.index.json" not in names and COMPLETE in names
    assert len(AutoModelForImageTextToText.from_pretrained(sharded).model.language_model.layers) == 7


def test_corrupt_weight_files_are_one_line_errors(capsys, tmp_path, llava, data):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llava, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    corrupt = f"weights file {weights} is corrupt or truncated"
    fails(capsys, "eval", "--model", bad, "--data", data["test"], "--images", data["images"], match=corrupt)
    fails(capsys, "prune", "--model", bad, "--layers", "2", "--output", tmp_path / "p", match=corrupt)
    fails(capsys, "score", "--model", bad, "--data", data["calibration"], "--images", data["images"],
          "--out", tmp_path / "s.json", match=corrupt)  # fmt: skip
    checkpoint = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(bad, checkpoint)
    fails(capsys, *_train(llava, data, tmp_path / "run", "--resume_from_checkpoint", checkpoint),
          match=f"weights file {checkpoint / 'model.safetensors'} is corrupt or truncated")  # fmt: skip


def _corrupt_first_image(data, tmp_path):
    """A copy of the training file whose first record's image is garbage bytes; returns (file, image path)."""
    records = json.loads(open(data["train"]).read())
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG not really")
    records[0]["image"] = str(bad)
    path = tmp_path / "train_corrupt.json"
    path.write_text(json.dumps(records))
    return path, records[0]


def test_bad_data_is_found_before_any_weights_load(capsys, tmp_path, llava, data):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "out"
    fails(capsys, *_train(llava, {**data, "train": empty}, out), match=f"conversation file {empty} holds no records")
    path, record = _corrupt_first_image(data, tmp_path)
    line = fails(capsys, *_train(llava, {**data, "train": path}, out), match=f"record 0 (id '{record['id']}') of")
    assert "corrupt.png' is not a readable image" in line and not out.exists()
    code, _, err = cli(capsys, *_train(llava, {**data, "train": path}, out, "--skip_bad_images"))
    assert code == 0, err
    assert (out / COMPLETE).is_file()  # trained on the records that remain


def test_score_flags_are_checked_before_scoring(capsys, tmp_path, llava, data):
    base = ["score", "--model", llava, "--data", data["calibration"], "--images", data["images"]]
    fails(capsys, *base, "--batch_size", 0, "--out", tmp_path / "s.json", match="--batch_size must be >= 1, got 0")
    fails(capsys, *base, "--out", tmp_path / "no" / "s.json", match="the folder")
    empty = tmp_path / "scores.json"
    empty.write_text("")
    fails(capsys, "prune", "--model", llava, "--scores", empty, "--remove", 1, "--output", tmp_path / "p",
          match=f"scores file {str(empty)!r} is empty")  # fmt: skip
    assert not (tmp_path / "p").exists()
