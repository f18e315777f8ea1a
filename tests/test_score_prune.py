"""score_layers and prune_outside_region on tiny HF-native Llava and Qwen2-VL."""

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from vr_plugin import apply_visual_region, find_decoder_layers, read_pruning, read_region
from vr_plugin.prune import prune_outside_region
from vr_plugin.score import load_scores, score_layers
from vr_plugin.tiny import available, build_model, example_inputs

from .common import forward

VLMS = [a for a in ("llava", "qwen2_vl") if available(a)]


def _model(arch, seed=0):
    model = build_model(arch, seed=seed).eval()
    apply_visual_region(model, "uniform_0.25")  # region [1, 7] recorded in the config
    return model


def _skipping(model, removed):
    """Make the given layers identity maps (input passes through), as the reference for a pruned model."""
    layers = find_decoder_layers(model).layers
    handles = []
    for index in removed:

        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handles.append(layers[index].register_forward_hook(hook, with_kwargs=True))
    return handles


@pytest.mark.parametrize("arch", VLMS)
def test_pruned_logits_equal_skipping_those_layers(arch):
    model = _model(arch)
    inputs = example_inputs(model.config, labels=False)
    removed = [2, 4, 5]
    handles = _skipping(model, removed)
    with torch.no_grad():
        reference = forward(model, inputs, use_cache=False).logits
    for handle in handles:
        handle.remove()
    prune_outside_region(model, remove=removed)
    with torch.no_grad():
        pruned = forward(model, inputs, use_cache=False).logits
    assert torch.allclose(pruned, reference, atol=1e-6)
    assert len(find_decoder_layers(model).layers) == 5


@pytest.mark.parametrize("arch", VLMS)
def test_cached_generation_equals_uncached_after_pruning(arch):
    model = _model(arch)
    prune_outside_region(model, remove=[0, 3, 5])  # non-contiguous kept set [1, 2, 4, 6, 7]
    layers = find_decoder_layers(model).layers
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(5))
    inputs = example_inputs(model.config, batch=1, labels=False)
    kwargs = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached) and cached.shape[1] == inputs["input_ids"].shape[1] + 8


@pytest.mark.parametrize("arch", VLMS)
def test_save_and_plain_from_pretrained_round_trip(tmp_path, arch):
    model = _model(arch)
    scores = score_layers(model, [example_inputs(model.config, labels=False)], "bi", progress=False)
    record = prune_outside_region(model, remove=2, scores=scores)
    model.save_pretrained(tmp_path)
    inputs = example_inputs(model.config, labels=False)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = forward(model, inputs, use_cache=False).logits
    # a fresh interpreter that never imports vr_plugin
    code = (
        "import sys, torch, transformers;"
        f"m = transformers.{type(model).__name__}.from_pretrained(sys.argv[1]).eval();"
        "x = torch.load(sys.argv[1] + '/inputs.pt');"
        "torch.save(m(**x, use_cache=False).logits, sys.argv[1] + '/logits.pt');"
        "assert 'vr_plugin' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    saved = json.loads((tmp_path / "config.json").read_text())
    text = saved.get("text_config", saved)
    assert text["num_hidden_layers"] == 6
    if "layer_types" in text:
        assert len(text["layer_types"]) == 6
    assert saved["layer_pruning"]["removed"] == record.removed and saved["layer_pruning"]["original_num_layers"] == 8
    assert read_region(str(tmp_path)).layers == [record.kept.index(1), record.kept.index(7)]


def test_region_layers_never_removed_unless_allowed():
    model = _model("llava")
    scores = {i: float(i) for i in range(8)}
    scores[1] = scores[7] = -1.0  # the region scores lowest
    record = prune_outside_region(model, remove=2, scores=scores)
    assert record.removed == [0, 2]
    assert read_region(model).layers == [0, 5] and read_region(model).num_layers == 6

    other = _model("llava")
    assert prune_outside_region(other, remove=2, scores=scores, allow_region=True).removed == [1, 7]
    assert read_region(other).layers == []
    with pytest.raises(ValueError, match="in the visual region"):
        prune_outside_region(_model("llava"), remove=[1, 3])
    with pytest.raises(ValueError, match="only 6 lie outside the region"):
        prune_outside_region(_model("llava"), remove=7, scores=scores)
    with pytest.raises(ValueError, match="needs scores="):
        prune_outside_region(_model("llava"), remove=2)


def test_repeated_pruning_keeps_original_numbering():
    model = _model("llava")
    prune_outside_region(model, remove=[2, 3])  # kept 0 1 4 5 6 7
    record = prune_outside_region(model, remove=[3])  # current 3 = original 5
    assert record.removed == [2, 3, 5] and record.kept == [0, 1, 4, 6, 7] and record.original_num_layers == 8
    assert read_pruning(model).kept == [0, 1, 4, 6, 7]
    assert read_region(model).layers == [1, 4]


def test_ratio_and_bad_counts():
    scores = {i: float(i) for i in range(8)}
    assert prune_outside_region(_model("llava"), remove=0.25, scores=scores).removed == [0, 2]
    for bad in (8, -1, 1.5, True):
        with pytest.raises(ValueError, match="remove="):
            prune_outside_region(_model("llava"), remove=bad, scores=scores)


@pytest.mark.parametrize("arch", VLMS)
def test_block_influence_matches_output_hidden_states(arch):
    model = _model(arch)
    inputs = example_inputs(model.config, labels=False)
    scores = score_layers(model, [inputs], "bi", progress=False)
    norm_input = {}
    norm = find_decoder_layers(model).layers[-1]
    layers = find_decoder_layers(model).layers
    layers[-1].register_forward_hook(lambda m, a, k, o: norm_input.setdefault("out", o), with_kwargs=True)
    with torch.no_grad():
        states = forward(model, inputs, output_hidden_states=True, use_cache=False).hidden_states
    last = norm_input["out"][0] if isinstance(norm_input["out"], tuple) else norm_input["out"]
    outputs = list(states[1:-1]) + [last]  # the last hidden_states entry is after the final norm
    assert norm is layers[-1]
    for i in range(8):
        direct = 1 - torch.nn.functional.cosine_similarity(states[i], outputs[i], dim=-1).mean().item()
        assert abs(scores[i] - direct) < 1e-4, (i, scores[i], direct)


@pytest.mark.parametrize("arch", VLMS)
def test_image_and_text_block_influence_use_image_positions(arch):
    model = _model(arch)
    inputs = example_inputs(model.config, labels=False)
    image = score_layers(model, [inputs], "bi_image", progress=False)
    text = score_layers(model, [inputs], "bi_text", progress=False)
    both = score_layers(model, [inputs], "bi_multimodal", progress=False)
    token = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
    mask = inputs["input_ids"] == token
    with torch.no_grad():
        states = forward(model, inputs, output_hidden_states=True, use_cache=False).hidden_states
    cos = torch.nn.functional.cosine_similarity(states[2], states[3], dim=-1)
    assert abs(image[2] - (1 - cos[mask].mean().item())) < 1e-5
    assert abs(text[2] - (1 - cos[~mask].mean().item())) < 1e-5
    assert abs(both[2] - 0.5 * (image[2] + text[2])) < 1e-5


def test_padding_is_masked():
    model = _model("llava")
    inputs = example_inputs(model.config, batch=2, labels=False)
    padded = {k: v.clone() for k, v in inputs.items()}
    padded["input_ids"] = torch.cat([inputs["input_ids"], torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded["attention_mask"] = torch.cat([inputs["attention_mask"], torch.zeros(2, 5, dtype=torch.long)], dim=1)
    if "mm_token_type_ids" in padded:
        padded["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(2, 5, dtype=torch.long)], 1)
    plain = score_layers(model, [inputs], "bi", progress=False)
    masked = score_layers(model, [padded], "bi", progress=False)
    assert all(abs(plain[i] - masked[i]) < 1e-5 for i in range(8))


def test_angular_blocks_and_report_file(tmp_path):
    model = _model("llava")
    batches = [example_inputs(model.config, labels=False, seed=s) for s in range(2)]
    path = str(tmp_path / "scores.json")
    single = score_layers(model, batches, "angular", progress=False, out=path, model_id="tiny", data_description="x")
    bi = score_layers(model, batches, "bi", progress=False)
    assert sorted(single, key=single.get)[:3] == sorted(bi, key=bi.get)[:3]  # monotone per token
    report = load_scores(path)
    assert report.metric == "angular" and report.model == "tiny" and report.data == "x" and report.scores == single
    blocks = score_layers(model, batches, "angular", n=3, progress=False)
    assert sorted(blocks) == list(range(6)) and all(0 <= v <= 1 for v in blocks.values())
    last = score_layers(model, batches, "angular", last_token=True, progress=False)
    assert last != single
    with pytest.raises(ValueError, match="block scores"):
        prune_outside_region(model, remove=1, scores=_block_report(blocks, tmp_path))


def _block_report(blocks, tmp_path):
    from vr_plugin.score import ScoreReport, save_scores

    return save_scores(str(tmp_path / "blocks.json"), ScoreReport("angular", blocks, 8, n=3))


def test_weight_change_scores():
    base = build_model("llava", seed=0)
    trained = build_model("llava", seed=0)
    with torch.no_grad():
        layer = find_decoder_layers(trained).layers[3]
        layer.mlp.down_proj.weight.mul_(1.5)  # ||W' - W|| / ||W|| = 0.5
    scores = score_layers(trained, metric="weight_change", reference=base)
    assert abs(scores[3] - 0.5) < 1e-6 and all(scores[i] == 0 for i in range(8) if i != 3)
    with pytest.raises(ValueError, match="needs reference="):
        score_layers(trained, metric="weight_change")


def test_bad_metric_and_no_data():
    model = _model("llava")
    with pytest.raises(ValueError, match="unknown metric"):
        score_layers(model, [], "perplexity")
    with pytest.raises(ValueError, match="saw no tokens"):
        score_layers(model, [], "bi", progress=False)
    with pytest.raises(ValueError, match="needs calibration batches"):
        score_layers(model, None, "bi")


class _DepthScaledLayer(torch.nn.Module):
    """MiniCPM's decoder layer in miniature: each residual branch is scaled by scale_depth / sqrt(depth)."""

    def __init__(self, depth):
        super().__init__()
        self.scale_depth, self.num_hidden_layers = 1.4, depth
        self.self_attn = torch.nn.Module()
        self.self_attn.q_proj, self.self_attn.o_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.mlp = torch.nn.Module()
        self.mlp.up_proj, self.mlp.down_proj = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8, bias=False)

    def forward(self, hidden):
        scale = self.scale_depth / math.sqrt(self.num_hidden_layers)
        hidden = hidden + self.self_attn.o_proj(torch.tanh(self.self_attn.q_proj(hidden))) * scale
        return hidden + self.mlp.down_proj(torch.relu(self.mlp.up_proj(hidden))) * scale


class _DepthScaledModel(torch.nn.Module):
    def __init__(self, depth=6):
        super().__init__()
        self.config = types.SimpleNamespace(num_hidden_layers=depth)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(10, 8)
        self.model.layers = torch.nn.ModuleList(_DepthScaledLayer(depth) for _ in range(depth))

    def forward(self, ids):
        hidden = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            hidden = layer(hidden)
        return hidden


def test_depth_scaled_residuals_stay_exact():
    """Pruning rescales MiniCPM-style layers so a checkpoint rebuilt at the new depth computes the same."""
    torch.manual_seed(0)
    model, ids = _DepthScaledModel(6), torch.randint(0, 10, (2, 5))
    handles = _skipping(model, [1, 4])
    with torch.no_grad():
        reference = model(ids)
    for handle in handles:
        handle.remove()
    prune_outside_region(model, remove=[1, 4], region="none")
    assert [layer.num_hidden_layers for layer in model.model.layers] == [4] * 4 and model.config.num_hidden_layers == 4
    rebuilt = _DepthScaledModel(4)  # what from_pretrained builds from the saved (pruned) config
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(ids), reference, atol=1e-6) and torch.allclose(rebuilt(ids), reference, atol=1e-6)


def test_scoring_memory_does_not_grow_with_depth():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    script = os.path.join(os.path.dirname(__file__), "scripts", "score_memory.py")
    points = ["8:score", "32:score", "8:hidden_states", "32:hidden_states"]
    run = subprocess.run([sys.executable, script, *points], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    peak = json.loads(run.stdout.strip().splitlines()[-1])
    hidden_state_mib = 8 * 256 * 256 * 4 / 2**20  # one [8, 256, 256] fp32 hidden state = 2 MiB
    assert peak["32:score"] - peak["8:score"] < hidden_state_mib, peak
    # the control, which keeps every hidden state, does grow: this test can fail
    assert peak["32:hidden_states"] - peak["8:hidden_states"] > 10 * hidden_state_mib, peak


def _scores_file(model, path, values):
    """A scores JSON of ``model`` (with its identity) holding ``values`` ({layer: score})."""
    from vr_plugin.locate import model_identity
    from vr_plugin.score import ScoreReport, save_scores

    report = ScoreReport("bi", dict(values), len(values), identity=model_identity(model.config))
    return save_scores(str(path), report)


def test_scores_of_another_model_are_refused(tmp_path):
    twelve = build_model("llava", num_layers=12)
    foreign = _scores_file(twelve, tmp_path / "twelve.json", {i: float(i) for i in range(12)})
    model = _model("llava")
    with pytest.raises(
        ValueError, match=r"belong to another model \(fingerprint \w+, 12 original layers\) than this one"
    ):
        prune_outside_region(model, remove=2, scores=foreign)
    with pytest.raises(ValueError, match="cover layers up to 11, but this model has 8 layers"):
        prune_outside_region(model, remove=2, scores={i: float(i) for i in range(12)})
    assert len(find_decoder_layers(model).layers) == 8


def test_scores_follow_the_original_numbering_on_a_pruned_model(tmp_path):
    model = _model("llava")
    scores = {0: 5.0, 1: 9.0, 2: 0.1, 3: 0.2, 4: 3.0, 5: 0.3, 6: 4.0, 7: 9.0}  # of the unpruned model
    path = _scores_file(model, tmp_path / "scores.json", scores)
    assert prune_outside_region(model, remove=1, scores=path).removed == [2]  # current = original numbering
    # now current layer 2 is original 3: the next-lowest by original numbering is 3 (0.2), then 5 (0.3)
    record = prune_outside_region(model, remove=2, scores=path)
    assert record.removed == [2, 3, 5] and record.kept == [0, 1, 4, 6, 7]


def test_explicit_removal_takes_whole_layer_numbers_only():
    for bad in ([2.7], [9], [True]):
        with pytest.raises(ValueError, match=r"give layer indices, whole numbers in 0\.\.7"):
            prune_outside_region(_model("llava"), remove=bad, region="none")
