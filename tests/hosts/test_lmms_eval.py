"""lmms-eval 0.7.3 (its own venv: tests/hosts/stack_lmms_eval.py) on checkpoints vr_plugin trains and prunes.

A tiny Llava is region-tuned, scored and pruned with ``vr-plugin``; lmms-eval's own ``llava_hf`` classes (simple and
chat, resolved through lmms-eval's model registry) load both saved directories without missing or unexpected keys
and answer lmms-eval ``Instance`` requests; ``vr_pruned`` (the trained checkpoint pruned in memory) holds the same
tensors and gives the same answers and log-likelihoods as the pruned directory; lmms-eval's CLI runs both on a local
task through ``python -m vr_plugin.integrations.lmms_eval``; an ``lmms_eval.models`` entry point finds ``vr_pruned``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from vr_plugin.record import read_pruning, read_region

from ..stacks import ROOT, current
from .lmms_helpers import TASK, docs_from, write_entry_point, write_task

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(current() != "lmms_eval", reason="runs inside the lmms_eval stack (tests/test_stacks.py)"),
]

REMOVE = 2
LOAD = "dtype=float32,device_map=cpu"
SAVED_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny Llava -> ``vr-plugin train`` (region uniform_0.25, 1 step) -> ``score`` -> ``prune --remove 2``."""
    from vr_plugin.cli import main
    from vr_plugin.synthetic import make_vqa_dataset
    from vr_plugin.tiny import save_tiny_lvlm

    root = tmp_path_factory.mktemp("lmms")
    base = save_tiny_lvlm("llava", str(root / "base"), num_layers=8, hidden=64)
    data = make_vqa_dataset(str(root / "data"), n_train=4, n_test=4)
    dirs = {"trained": str(root / "trained"), "pruned": str(root / "pruned"), "scores": str(root / "scores.json")}
    images = ["--images", data["images"]]
    train = ["train", "--model", base, "--data", data["train"], *images, "--visual_region", "uniform_0.25"]
    assert main([*train, "--output", dirs["trained"], "--max_steps", "1", "--save_strategy", "no"]) == 0
    score = ["score", "--model", dirs["trained"], "--data", data["calibration"], *images]
    assert main([*score, "--out", dirs["scores"]]) == 0
    prune = ["prune", "--model", dirs["trained"], "--scores", dirs["scores"], "--remove", str(REMOVE)]
    assert main([*prune, "--output", dirs["pruned"]]) == 0
    return dict(dirs, root=str(root), docs=docs_from(data["test"], data["images"])[:2])


@contextmanager
def load_reports():
    """Capture transformers' "LOAD REPORT" warnings (missing / unexpected / mismatched keys) while loading."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    source = logging.getLogger("transformers.modeling_utils")
    source.addHandler(handler)
    try:
        yield records
    finally:
        source.removeHandler(handler)


def reports_in(records: list) -> list:
    return [r for r in records if "LOAD REPORT" in r]


def build(model: str, model_args: str, force_simple: bool = False):
    """An lmms-eval model as its evaluator builds one: registry lookup, then ``create_from_arg_string``."""
    from lmms_eval.models import get_model

    return get_model(model, force_simple).create_from_arg_string(model_args, {"device": "cpu", "batch_size": 1})


def answer(lm, docs: list) -> dict:
    """Greedy answers to lmms-eval ``generate_until`` requests, and (simple class) the logits of the first prompt.

    (lmms-eval 0.7.3's ``llava_hf.loglikelihood`` fails on transformers 5: it tokenizes the prompt with its
    ``<image>`` token but no image, which ``LlavaProcessor`` refuses; so logits stand in for log-likelihoods.)
    """
    from lmms_eval.api.instance import Instance

    lm.task_dict = {TASK: {"test": docs}}

    def visual(doc):
        return [doc["image"]]

    def messages(doc):
        content = [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["q"]}]
        return [{"role": "user", "content": content}]

    def request(kind, args, i):
        return Instance(kind, args, i, {"task": TASK, "doc_id": i, "repeats": 1})

    gen = {"max_new_tokens": 6, "temperature": 0}
    docs = list(enumerate(docs))
    if not lm.is_simple:  # chat models get messages
        requests = [request("generate_until", (d["q"], messages, dict(gen), i, TASK, "test"), i) for i, d in docs]
        return {"generate": [r.text for r in lm.generate_until(requests)]}
    requests = [request("generate_until", (d["q"], dict(gen), visual, i, TASK, "test"), i) for i, d in docs]
    inputs = lm._image_processor(images=[docs[0][1]["image"]], text=f"<image>\n{docs[0][1]['q']}", return_tensors="pt")
    with torch.inference_mode():
        logits = lm.model(**inputs).logits
    return {"generate": lm.generate_until(requests), "logits": logits}


def saved_state(path: str) -> dict:
    """The state dict of ``path`` loaded by plain ``from_pretrained``, whose loading info must be empty."""
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.state_dict()


def file_layer_ids(path: str) -> set:
    """The decoder-layer indices of the LLM's tensors in ``path``'s safetensors file."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as handle:
        names = [k for k in handle.keys() if "language_model" in k]
    return {int(m.group(1)) for m in map(re.compile(r"\.layers\.(\d+)\.").search, names) if m}


def assert_same_state(state: dict, expected: dict) -> None:
    assert sorted(state) == sorted(expected)
    different = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert not different, different


@pytest.fixture(scope="module")
def llava_hf(workspace):
    """lmms-eval's ``llava_hf`` (simple class) on each saved directory: load reports, tensors, answers."""
    runs = {}
    for name in ("trained", "pruned"):
        with load_reports() as records:
            lm = build("llava_hf", f"pretrained={workspace[name]},{LOAD}", force_simple=True)
        runs[name] = {"reports": reports_in(records), "state": lm.model.state_dict()}
        runs[name].update(answers=answer(lm, workspace["docs"]), depth=len(lm.model.model.language_model.layers))
    return runs


def test_saved_directories_hold_processor_and_consistent_layer_config(workspace):
    """Both saves carry processor, tokenizer and chat template; the pruned config's per-layer fields agree."""
    from transformers import AutoConfig, AutoProcessor

    for name in ("trained", "pruned"):
        assert all(os.path.isfile(os.path.join(workspace[name], f)) for f in SAVED_FILES), os.listdir(workspace[name])
        processor = AutoProcessor.from_pretrained(workspace[name])
        assert processor.chat_template and processor.tokenizer.chat_template
        assert processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    trained, pruned = (AutoConfig.from_pretrained(workspace[n]) for n in ("trained", "pruned"))
    region, record = read_region(trained), read_pruning(pruned)
    assert trained.text_config.num_hidden_layers == 8 and region.num_layers == 8 and region.spec == "uniform_0.25"
    assert len(record.removed) == REMOVE and not set(record.removed) & set(region.layers)
    assert record.kept == [i for i in range(8) if i not in record.removed]
    assert pruned.text_config.num_hidden_layers == len(record.kept) == 8 - REMOVE
    assert read_region(pruned).layers == [record.kept.index(i) for i in region.layers]
    assert read_region(pruned).num_layers == 8 - REMOVE
    assert file_layer_ids(workspace["trained"]) == set(range(8))
    assert file_layer_ids(workspace["pruned"]) == set(range(8 - REMOVE))


def test_llava_hf_loads_saved_checkpoints_without_missing_or_unexpected_keys(workspace, llava_hf):
    """lmms-eval's own llava_hf loads every saved tensor (none missing, none unexpected) and answers requests."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    for name, depth in (("trained", 8), ("pruned", 8 - REMOVE)):
        run = llava_hf[name]
        assert run["reports"] == [] and run["depth"] == depth
        assert_same_state(run["state"], saved_state(workspace[name]))
        generated = run["answers"]["generate"]
        assert len(generated) == 2 and all(isinstance(text, str) and text for text in generated)
        assert torch.isfinite(run["answers"]["logits"]).all()
    assert not torch.allclose(llava_hf["trained"]["answers"]["logits"], llava_hf["pruned"]["answers"]["logits"])
    with load_reports() as records:  # the capture sees a bad load: pruned weights into the 8-layer config
        LlavaForConditionalGeneration.from_pretrained(
            workspace["pruned"], config=AutoConfig.from_pretrained(workspace["trained"])
        )
    assert any("MISSING" in r for r in reports_in(records))


def test_vr_pruned_matches_the_pruned_checkpoint(workspace, llava_hf):
    """``vr_pruned`` (trained dir + scores, pruned in memory) == llava_hf on the pruned dir: tensors and answers."""
    from lmms_eval.models.simple.llava_hf import LlavaHf
    from transformers import AutoConfig

    from vr_plugin.integrations import lmms_eval as integration

    integration.register()
    pruned_args = f"pretrained={workspace['trained']},scores={workspace['scores']},remove={REMOVE},dtype=float32"
    with load_reports() as records:
        lm = build("vr_pruned", pruned_args, force_simple=True)
    assert isinstance(lm, LlavaHf) and reports_in(records) == []
    assert lm.pruning.removed == read_pruning(workspace["pruned"]).removed
    assert_same_state(lm.model.state_dict(), saved_state(workspace["pruned"]))
    answers, on_disk_answers = answer(lm, workspace["docs"]), llava_hf["pruned"]["answers"]
    assert answers["generate"] == on_disk_answers["generate"]
    assert torch.equal(answers["logits"], on_disk_answers["logits"])
    on_disk = AutoConfig.from_pretrained(workspace["pruned"])
    assert lm.model.config.text_config.num_hidden_layers == on_disk.text_config.num_hidden_layers == 8 - REMOVE
    assert read_pruning(lm.model.config) == read_pruning(on_disk) and read_region(lm.model) == read_region(on_disk)

    chat, chat_on_disk = build("vr_pruned", pruned_args), build("llava_hf", f"pretrained={workspace['pruned']},{LOAD}")
    assert not chat.is_simple and type(chat).__mro__[1] is type(chat_on_disk)
    assert answer(chat, workspace["docs"]) == answer(chat_on_disk, workspace["docs"])

    layers = ";".join(str(i) for i in read_pruning(workspace["pruned"]).removed)
    by_index = build("vr_pruned", f"pretrained={workspace['trained']},layers=[{layers}],dtype=float32", True)
    assert_same_state(by_index.model.state_dict(), saved_state(workspace["pruned"]))


def nll_by_hand(path: str, docs: list, continuations: list) -> list:
    """Mean negative log-likelihood of each continuation after its image and question, by log-softmax over the logits
    of ``path`` loaded by plain transformers (the prompt's length counted with its image tokens expanded)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    template = processor.tokenizer.apply_chat_template
    losses = []
    for doc, text in zip(docs, continuations):
        user = {"role": "user", "content": f"{processor.image_token}\n{doc['q']}"}
        prompt = template([user], tokenize=False, add_generation_prompt=True)
        whole = template([user, {"role": "assistant", "content": text}], tokenize=False)
        inputs = processor(text=[whole], images=[doc["image"]], return_tensors="pt")
        start = processor(text=[prompt], images=[doc["image"]], return_tensors="pt")["input_ids"].shape[1]
        with torch.inference_mode():
            logits = model(**inputs).logits[0]
        tokens = inputs["input_ids"][0, start:]
        assert len(tokens) > 0
        losses.append(-logits[start - 1 : -1].log_softmax(-1).gather(-1, tokens[:, None]).mean().item())
    return losses


def test_vr_pruned_loglikelihood_scores_only_the_continuation(workspace):
    """lmms-eval ``loglikelihood`` requests (multiple-choice tasks) on ``vr_pruned``: lmms-eval 0.7.3's own
    ``llava_hf`` method fails on transformers 5; ours gives the mean NLL of exactly the continuation tokens, equal to
    the one computed by hand on the pruned directory, for the simple and the chat class."""
    from lmms_eval.api.instance import Instance

    from vr_plugin.integrations import lmms_eval as integration

    integration.register()
    pruned_args = f"pretrained={workspace['trained']},scores={workspace['scores']},remove={REMOVE},dtype=float32"
    docs = workspace["docs"]
    continuations = [doc["a"] for doc in docs] + ["zebra crossing"] * len(docs)
    expected = nll_by_hand(workspace["pruned"], docs * 2, continuations)
    for simple in (True, False):
        lm = build("vr_pruned", pruned_args, simple)
        lm.task_dict = {TASK: {"test": docs}}
        requests = [
            Instance(
                "loglikelihood",
                (docs[i % len(docs)]["q"], text, lambda doc: [doc["image"]], i % len(docs), TASK, "test"),
                i,
                {"task": TASK, "doc_id": i % len(docs), "repeats": 1},
            )
            for i, text in enumerate(continuations)
        ]
        results = lm.loglikelihood(requests)
        assert all(isinstance(greedy, bool) for _, greedy in results)
        assert [loss for loss, _ in results] == pytest.approx(expected, rel=1e-5)
    assert expected[0] != pytest.approx(expected[len(docs)])


def config_only(workspace, tmp_path) -> str:
    """A copy of the trained directory without its weights: loading them would fail with OSError."""
    folder = tmp_path / "no-weights"
    shutil.copytree(workspace["trained"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return str(folder)


BAD_ARGS = [
    ({"remove": 2}, "remove= chooses the lowest-scoring layers: it needs scores="),
    ({}, "needs remove=COUNT|RATIO .* or layers=I;J, exactly one"),
    ({"remove": 2, "layers": "3"}, "exactly one"),
    ({"remove": 8, "scores": "S"}, r"remove=8: give a layer count 0\.\.7"),
    ({"remove": "two", "scores": "S"}, "remove='two'"),
    ({"remove": 1.5, "scores": "S"}, r"remove=1\.5"),
    ({"layers": "12"}, "layers: "),
    ({"layers": "3", "scores": "S"}, "scores= only goes with remove="),
    ({"remove": 2, "scores": "S", "visual_region": "bogus_0.25"}, "visual_region: "),
    ({"remove": 2, "scores": "S", "allow_region": "maybe"}, "allow_region='maybe': give true or false"),
    ({"remove": 2, "scores": "missing.json"}, "scores='missing.json': scores file"),
    ({"remove": 2, "scores": "OTHER"}, "belong to another model"),
]


@pytest.mark.parametrize("args,message", BAD_ARGS, ids=[m.split(":")[0][:30] for _, m in BAD_ARGS])
def test_bad_model_args_fail_before_weights_load(workspace, tmp_path, args, message):
    """Each bad model arg is one ValueError naming it, raised before weights load (a weightless dir never loads)."""
    from vr_plugin.integrations.lmms_eval import VRPrunedLlavaHf

    scores = json.loads(open(workspace["scores"], encoding="utf-8").read())
    scores["identity"]["fingerprint"] = "0" * 16
    (tmp_path / "other.json").write_text(json.dumps(scores))
    swap = {"S": workspace["scores"], "OTHER": str(tmp_path / "other.json")}
    args = {k: swap.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=message):
        VRPrunedLlavaHf(pretrained=config_only(workspace, tmp_path), device="cpu", **args)


def test_bad_pretrained_and_sharding_fail_before_weights_load(workspace, tmp_path, monkeypatch):
    """A missing or adapter-only ``pretrained=`` and FSDP are refused; good args on a weightless dir reach loading."""
    from vr_plugin.integrations.lmms_eval import VRPrunedLlavaHf

    good = {"remove": REMOVE, "scores": workspace["scores"], "device": "cpu"}
    with pytest.raises(ValueError, match="pretrained='.*nowhere'"):
        VRPrunedLlavaHf(pretrained=str(tmp_path / "nowhere"), **good)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": workspace["trained"]}))
    with pytest.raises(ValueError, match="is a peft adapter directory"):
        VRPrunedLlavaHf(pretrained=str(adapter), **good)
    weightless = config_only(workspace, tmp_path)
    with pytest.raises(OSError):  # the positive control: past the checks, loading is what fails
        VRPrunedLlavaHf(pretrained=weightless, **good)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="ACCELERATE_USE_FSDP=1 shards"):
        VRPrunedLlavaHf(pretrained=weightless, **good)


def test_launcher_runs_lmms_eval_cli_on_a_local_task(workspace, tmp_path, monkeypatch):
    """``python -m vr_plugin.integrations.lmms_eval`` runs lmms-eval's CLI: llava_hf on the pruned dir and
    vr_pruned on the trained dir (one --config, two runs) score a local JSON task with identical answers."""
    import yaml

    from vr_plugin.integrations.lmms_eval import main

    task_dir = write_task(tmp_path / "task", workspace["docs"])
    runs = [
        {"model": "llava_hf", "model_args": f"pretrained={workspace['pruned']},{LOAD}"},
        {
            "model": "vr_pruned",
            "model_args": f"pretrained={workspace['trained']},scores={workspace['scores']},remove=2",
        },  # noqa: E501
    ]
    (tmp_path / "runs.yaml").write_text(yaml.safe_dump(runs))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(sys, "argv", ["python -m vr_plugin.integrations.lmms_eval"])  # main() rewrites it
    out = tmp_path / "out"
    main(["--config", str(tmp_path / "runs.yaml"), "--tasks", TASK, "--include_path", task_dir, "--device", "cpu",
          "--batch_size", "1", "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"])  # fmt: skip
    samples = {}
    for name in ("pruned", "trained"):
        (folder,) = [p for p in out.iterdir() if p.name.endswith(name)]
        (results,) = folder.glob("*_results.json")
        assert "exact_match,none" in json.loads(results.read_text())["results"][TASK]
        (lines,) = folder.glob(f"*_samples_{TASK}.jsonl")
        samples[name] = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [s["doc_id"] for s in samples["pruned"]] == [0, 1]
    assert [s["filtered_resps"] for s in samples["trained"]] == [s["filtered_resps"] for s in samples["pruned"]]


def test_entry_point_makes_vr_pruned_a_plain_lmms_eval_model(tmp_path):
    """With an ``lmms_eval.models`` entry point naming ``manifests`` (what vr_plugin's pyproject would declare),
    lmms-eval's own registry resolves ``vr_pruned`` in a fresh process, no launcher involved."""
    write_entry_point(tmp_path / "entry")
    code = (
        "from lmms_eval.models import get_model; "
        "print(*(f'{c.__module__}.{c.__name__}:{c.is_simple}' for c in (get_model('vr_pruned'), "
        "get_model('vr_pruned', force_simple=True))))"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "entry"))
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [
        "vr_plugin.integrations.lmms_eval.VRPrunedLlavaHfChat:False",
        "vr_plugin.integrations.lmms_eval.VRPrunedLlavaHf:True",
    ]
