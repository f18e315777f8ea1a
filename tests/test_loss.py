"""The loss over the vocabulary in chunks (vr_plugin.loss, ``--loss_chunk``): the model's own loss and gradients on
every family of the matrix, without the whole logits; refusals; and a ``vr-plugin train`` run equal to one without."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vr_plugin.cli import main
from vr_plugin.locate import unwrap_model
from vr_plugin.loss import DEFAULT_LOSS_CHUNK, check_chunkable, chunked_cross_entropy, chunked_loss
from vr_plugin.synthetic import make_vqa_dataset
from vr_plugin.tiny import build_model, example_inputs, save_tiny_lvlm

from .common import forward
from .matrix import cases

CHUNK = 3  # smaller than every tiny sample's labelled positions: several chunks per batch


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_close_grads(got, expected):
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", cases(where=lambda c: c.forward))
def test_chunked_loss_is_the_models_own(case):
    """Same loss and gradients as the model's forward (backward inside the block here, after it in the peft test),
    logits never returned, the model restored after."""
    torch.manual_seed(0)
    model = build_model(case.name, hidden=32).train()
    inputs = example_inputs(model.config)
    expected = forward(model, inputs).loss
    expected.backward()
    expected_grads = _grads(model)
    with chunked_loss(model, CHUNK) as probe:
        outputs = forward(model, inputs)
        outputs.loss.backward()  # inside the block: the recomputed chunks reach the real lm_head
    assert probe.calls == 1 and outputs.logits.shape[-1] == 0
    torch.testing.assert_close(outputs.loss, expected, rtol=1e-5, atol=1e-6)
    _assert_close_grads(_grads(model), expected_grads)
    head = model.get_output_embeddings()
    assert "forward" not in head.__dict__ and "_loss_function" not in model.__dict__
    assert forward(model, inputs).logits.shape[-1] == model.config.get_text_config().vocab_size


def test_token_count_from_the_trainer_and_soft_capping():
    """``num_items_in_batch`` divides the summed loss (gradient accumulation); Gemma's soft-capping per chunk."""
    from transformers import Gemma3ForCausalLM

    config = build_model("gemma3", hidden=32).config.text_config
    config.final_logit_softcapping = 3.0
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).train()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits of several units, as a trained model's: the cap of 3 moves the loss
    ids = torch.randint(3, 100, (2, 12))
    labels = ids.masked_fill(torch.arange(12) < 4, -100)  # 16 labelled targets after the shift
    expected = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(20)).loss
    expected.backward()
    expected_grads = _grads(model)
    with chunked_loss(model, 5):
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(20)).loss
    loss.backward()
    torch.testing.assert_close(loss, expected)
    _assert_close_grads(_grads(model), expected_grads)
    with torch.no_grad():  # the same loss without the cap differs: the equality above needs the cap applied
        hidden = model.model(input_ids=ids).last_hidden_state
        uncapped = chunked_cross_entropy(model.lm_head, hidden, labels, 5, num_items_in_batch=torch.tensor(20))
        capped = chunked_cross_entropy(model.lm_head, hidden, labels, 5, torch.tensor(20), softcap=3.0)
    torch.testing.assert_close(capped, expected.detach())
    assert not torch.allclose(uncapped, expected.detach(), rtol=1e-2, atol=0)


def test_refusals():
    from transformers import LlamaForCausalLM

    class OwnLoss(LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    config = build_model("llama", hidden=32).config
    with pytest.raises(ValueError, match="OwnLoss computes its loss itself, not through loss_function"):
        check_chunkable(OwnLoss(config))
    with pytest.raises(ValueError, match="loss_chunk must be >= 1 positions, got 0"):
        with chunked_loss(LlamaForCausalLM(config), 0):
            pass
    assert DEFAULT_LOSS_CHUNK == 256


def test_peft_model_chunks_through_its_wrappers():
    """Under peft (LoRA, projector in ``modules_to_save``) the head and the loss function of the inner model."""
    from vr_plugin import apply_region_lora

    torch.manual_seed(0)
    model = apply_region_lora(build_model("llava", hidden=32), "uniform_0.25", lora_dropout=0.0)[0].train()
    inputs = example_inputs(unwrap_model(model).config)
    expected = forward(model, inputs).loss
    expected.backward()
    expected_grads = _grads(model)
    with chunked_loss(model, CHUNK) as probe:
        loss = forward(model, inputs).loss
    loss.backward()
    assert probe.calls == 1
    torch.testing.assert_close(loss, expected)
    _assert_close_grads(_grads(model), expected_grads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss")
    data = make_vqa_dataset(str(root / "data"), n_train=8, n_test=2)
    return save_tiny_lvlm("llava", str(root / "llava")), data


def test_train_with_loss_chunk_equals_train_without(tmp_path, tiny, monkeypatch):
    """``vr-plugin train --loss_chunk 4``: the same trained weights as the run without it (every step chunked)."""
    from vr_plugin import loss

    model, data = tiny
    calls = []
    chunked = loss._Chunked.loss_function
    monkeypatch.setattr(loss._Chunked, "loss_function", lambda self, **kw: calls.append(1) or chunked(self, **kw))
    runs = {}
    for name, extra in (("plain", []), ("chunked", ["--loss_chunk", "4"])):
        out = tmp_path / name
        argv = ["train", "--model", model, "--data", data["train"], "--images", data["images"], "--output", out]
        argv += ["--max_steps", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
        # SGD: updates proportional to the gradients, so float rounding stays rounding (Adam's normalisation would
        # blow up a near-zero gradient's rounding difference on another CPU); lr 1 moves the weights by ~0.2
        argv += ["--optim", "sgd", "--learning_rate", "1", "--save_strategy", "no", *extra]
        assert main([str(a) for a in argv]) == 0
        runs[name] = dict(AutoModelForImageTextToText.from_pretrained(out).named_parameters())
    assert len(calls) == 3 * 2  # 3 steps of 2 micro-batches, each through the chunked loss
    base = dict(AutoModelForImageTextToText.from_pretrained(model).named_parameters())
    moved = {run: {n for n, p in params.items() if not torch.equal(p, base[n])} for run, params in runs.items()}
    assert moved["chunked"] == moved["plain"] and moved["plain"]  # the same exact trained set
    assert max((runs["plain"][n] - base[n]).abs().max() for n in moved["plain"]) > 0.05
    for name in moved["plain"]:
        torch.testing.assert_close(runs["chunked"][name], runs["plain"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_train_loss_chunk_bad_values(capsys, tiny, tmp_path):
    model, data = tiny
    argv = ["train", "--model", model, "--data", data["train"], "--images", data["images"], "--output", tmp_path / "o"]
    assert main([str(a) for a in argv + ["--loss_chunk", "0"]]) == 2
    assert "loss_chunk must be >= 1 positions, got 0" in capsys.readouterr().err
    assert main([str(a) for a in argv + ["--loss_chunk", "4", "--label_smoothing_factor", "0.1"]]) == 2
    assert "loss_chunk computes the model's own loss: drop label_smoothing_factor" in capsys.readouterr().err
