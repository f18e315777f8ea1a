"""RegionFreezeCallback in a real transformers.Trainer run on a tiny HF Llava with synthetic images."""

import json
import os
import shutil

import pytest
import torch
import transformers
from packaging import version
from transformers import Trainer, TrainingArguments

from vr_plugin import RegionFreezeCallback, select_layers
from vr_plugin.callback import optimizer_parameters
from vr_plugin.tiny import build_model

from .common import LlavaSynthetic, changed, collate, freeze_vision, snapshot
from .matrix import PATHS

LAYERS, PROJECTOR, _ = PATHS["llava"]


def _model():
    model = build_model("llava")
    freeze_vision(model)  # as every LVLM recipe loads it
    return model


def _args(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
    )
    defaults.update(kw)
    return TrainingArguments(**defaults)


def _expected_changed(model, region):
    prefixes = tuple(f"{LAYERS}.{i}." for i in region) + tuple(PROJECTOR)
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def test_trainer_trains_exactly_the_region(tmp_path):
    model = _model()
    callback = RegionFreezeCallback("uniform_0.25")
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=LlavaSynthetic(model.config),
        data_collator=collate,
        callbacks=[callback],
    )
    before = snapshot(model)
    trainer.train()
    expected = _expected_changed(model, select_layers("uniform_0.25", 8))
    assert changed(before, model) == expected  # frozen bit-identical; every region tensor and the projector moved
    held = {id(p) for p in optimizer_parameters(trainer.optimizer)}
    assert held == {id(p) for p in callback.plan.trainable_params}
    assert {n for n, p in model.named_parameters() if id(p) in held} == expected
    assert model.config.visual_region["layers"] == [1, 7]
    with open(os.path.join(trainer.args.output_dir, "region_plan.json")) as handle:
        report = json.load(handle)
    assert set(report["trainable_names"]) == expected and report["layers"] == [1, 7]


def test_frozen_parameters_get_no_optimizer_state(tmp_path):
    model = _model()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        train_dataset=LlavaSynthetic(model.config, n=2),
        data_collator=collate,
        callbacks=[RegionFreezeCallback("1,2")],
    )
    trainer.train()
    stateful = {n for n, p in model.named_parameters() if trainer.optimizer.state.get(p)}
    assert stateful == _expected_changed(model, [1, 2])


def test_added_too_late_still_ends_with_correct_optimizer(tmp_path, caplog):
    model = _model()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=LlavaSynthetic(model.config),
        data_collator=collate,
    )
    trainer.add_callback(RegionFreezeCallback("uniform_0.25"))
    before = snapshot(model)
    with caplog.at_level("WARNING", logger="vr_plugin"):
        trainer.train()
    assert "added after the Trainer was built" in caplog.text
    assert changed(before, model) == _expected_changed(model, [1, 7])
    held = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in optimizer_parameters(trainer.optimizer)}}
    assert held == _expected_changed(model, [1, 7])


def test_optimizer_given_to_constructor_is_trimmed(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=2),
        train_dataset=LlavaSynthetic(model.config, n=4),
        data_collator=collate,
        optimizers=(optimizer, None),
        callbacks=[RegionFreezeCallback("3")],
    )
    before = snapshot(model)
    trainer.train()
    assert changed(before, model) == _expected_changed(model, [3])


def test_checkpoints_carry_the_region_and_resume_checks_it(tmp_path):
    model = _model()
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    dataset = LlavaSynthetic(model.config, n=4)
    callbacks = [RegionFreezeCallback("1,7")]
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=callbacks).train()
    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    with open(os.path.join(checkpoint, "visual_region.json")) as handle:
        assert json.load(handle)["layers"] == [1, 7]
    with open(os.path.join(checkpoint, "config.json")) as handle:
        assert json.load(handle)["visual_region"]["layers"] == [1, 7]

    # same number of tensors per optimizer group, different layers: refused when the Trainer is built, before the
    # Trainer (or DeepSpeed) loads any optimizer state
    other = _model()
    with pytest.raises(ValueError, match="Cannot resume from .*checkpoint-2.*'1,7'.*'0,6'"):
        Trainer(
            model=other,
            args=_args(tmp_path, max_steps=4),
            train_dataset=dataset,
            data_collator=collate,
            callbacks=[RegionFreezeCallback("0,6")],
        )
    if version.parse(transformers.__version__) < version.parse("4.47"):
        return  # 4.37 reloads its checkpoint with torch.load(weights_only=True) defaults it predates (torch 2.13)
    # the same region resumes, with its weights: RegionTrainer's checkpoints keep the runtime parameter names (the plain
    # Trainer of transformers 5 saves another layout and its resume would train on from the base weights: the
    # callback stops that, tests/test_resume.py)
    from vr_plugin import RegionTrainer

    shutil.rmtree(checkpoint)
    RegionTrainer(model=_model(), args=args, train_dataset=dataset, data_collator=collate,
                  callbacks=[RegionFreezeCallback("1,7")]).train()  # fmt: skip
    trainer = RegionTrainer(
        model=other,
        args=_args(tmp_path, max_steps=3),
        train_dataset=dataset,
        data_collator=collate,
        callbacks=[RegionFreezeCallback("1,7")],
    )
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3
