"""``vr-plugin demo``: the method end to end on a small model, with every number measured.

Everything is written under one folder (``./vr_demo`` by default):

1. ``data/``: a synthetic VQA set rendered with PIL (:func:`vr_plugin.synthetic.make_vqa_dataset`): one-word
   questions on colour, shape, count and position, split train / test; captions of the train images; calibration
   prompts ("Please describe this image in detail.") over the test images.
2. ``models/init``: a small Llava (:func:`vr_plugin.tiny.save_tiny_lvlm`), random weights, its own tokenizer,
   processor and chat template.
3. ``models/base``: the base model. A random LLM has nothing for the visual region to build on, so the demo first
   pre-trains every LLM and projector parameter on the captions, standing in for a pre-trained LLM plus LLaVA's
   alignment stage; the vision tower stays frozen throughout, as in LLaVA.
4. ``models/region`` and ``models/full``: visual instruction tuning on the train questions from that base, with the
   visual region (``uniform_0.25``) and with every layer (``all``), same data, steps, seed and learning rate.
5. Held-out accuracy of base, region and full (:func:`vr_plugin.evaluate.evaluate`).
6. ``scores/``: the angular distance of every layer on the calibration prompts (:func:`vr_plugin.score_layers`).
7. ``models/region-pruned``: the lowest-scoring layers outside the region removed
   (:func:`vr_plugin.prune_outside_region`); ``models/full-pruned``: as many of the full model's lowest-scoring layers
   removed, for comparison. Both are reloaded from disk and evaluated.
8. ``report.md`` (the table), ``layers.png`` (the LLM's depth: region, scores, pruned layers) and ``loss.png``.

Every stage runs through the same functions as ``vr-plugin train / eval / score / prune``.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

from .io import write_json
from .spec import DEFAULT_SPEC

__all__ = ["DemoConfig", "DemoResult", "run_demo", "answer_prior"]

logger = logging.getLogger(__name__)

REGION_SPEC = DEFAULT_SPEC
METRIC = "angular"


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults finish in a few minutes on 2 CPU cores and learn clearly above chance."""

    n_train: int = 1024
    n_test: int = 200
    num_layers: int = 8
    hidden: int = 64
    pretrain_steps: int = 200
    steps: int = 150
    batch_size: int = 32
    learning_rate: float = 5e-3
    remove: int = 2
    calibration: int = 64
    seed: int = 0
    threads: int = 1  # the demo's matrices are tiny: one thread is as fast, and immune to oversubscribed cores

    @classmethod
    def quick(cls) -> DemoConfig:
        """A reduced run for the test suite: the whole pipeline in well under a minute."""
        return cls(n_train=96, n_test=24, pretrain_steps=12, steps=8, batch_size=16, calibration=8)

    def validate(self) -> None:
        """Raise ``ValueError`` naming a size that cannot work."""
        for name in ("n_train", "n_test", "num_layers", "hidden", "pretrain_steps", "steps", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % 8:
            raise ValueError(f"demo hidden must be a multiple of 8 (4 attention heads of even size), got {self.hidden}")
        outside = self.num_layers - len(_region(self.num_layers))
        if not 0 <= self.remove <= outside:
            raise ValueError(
                f"demo remove={self.remove}: {self.num_layers} layers leave {outside} outside the region to prune"
            )


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, and what it measured."""

    out_dir: str
    report: str
    plot: Optional[str]
    rows: list
    seconds: float
    files: dict = field(default_factory=dict)


def _region(num_layers: int) -> list:
    from .spec import select_layers

    return select_layers(REGION_SPEC, num_layers)


def answer_prior(train_path: str, test_path: str) -> float:
    """Accuracy on ``test_path`` of always giving the most frequent training answer to each question text."""
    from .evaluate import is_correct, qa_records

    counts: dict = collections.defaultdict(collections.Counter)
    for _, question, answer in qa_records(train_path):
        counts[question][answer] += 1
    test = qa_records(test_path)
    hits = 0
    for _, question, answer in test:
        guess = counts[question].most_common(1)[0][0] if counts[question] else ""
        hits += is_correct(guess, answer, question)[0]
    return hits / len(test)


def _per_question(report: Any) -> dict:
    groups: dict = collections.defaultdict(list)
    for p in report.predictions:
        groups[p["question"]].append(p["correct"])
    return {q: sum(v) / len(v) for q, v in groups.items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Inside the demo: the vr_plugin library's INFO lines and transformers' loading bars stay off the console."""
    from ._logging import log_levels

    with log_levels(logging.WARNING, transformers_level=logging.ERROR, bars=False):
        with log_levels(logging.INFO, logger=logger.name):  # the demo's own stage lines
            yield


def _training_args(out: str, steps: int, config: DemoConfig, progress: bool) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=0.0,
        warmup_steps=min(10, max(1, steps // 10)),
        lr_scheduler_type="linear",
        logging_steps=max(1, steps // 40),
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def run_demo(out_dir: str = "vr_demo", config: Optional[DemoConfig] = None, progress: bool = True) -> DemoResult:
    """Run the whole demo into ``out_dir`` and return where the report is (see the module docstring)."""
    import torch

    config = config or DemoConfig()
    config.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with _quiet():
            return _run(os.path.abspath(out_dir), config, progress)
    finally:
        torch.set_num_threads(threads)


# The demo's eight stages, read top to bottom as the report lists them (one function on purpose).
def _run(out: str, config: DemoConfig, progress: bool) -> DemoResult:  # noqa: PLR0915
    import torch

    from .data import calibration_batches
    from .evaluate import evaluate
    from .prune import prune_outside_region
    from .score import score_layers
    from .synthetic import make_vqa_dataset
    from .tiny import save_tiny_lvlm
    from .training import RegionTrainingConfig, load_model, save_model, train

    start = time.perf_counter()
    models = os.path.join(out, "models")
    os.makedirs(models, exist_ok=True)
    timings: dict = {}

    def stage(name: str, message: str) -> float:
        logger.info("[%s] %s", name, message)
        return time.perf_counter()

    t = stage("1/8", f"synthetic VQA set: {config.n_train} train / {config.n_test} test questions")
    data = make_vqa_dataset(os.path.join(out, "data"), config.n_train, config.n_test, seed=config.seed)
    init = save_tiny_lvlm("llava", os.path.join(models, "init"), config.num_layers, config.hidden, seed=config.seed)
    timings["data and model"] = time.perf_counter() - t

    def run(name: str, source: str, records: str, spec: str, steps: int, **tune: bool) -> Any:
        region = RegionTrainingConfig(
            model=source, data=records, images=data["images"], visual_region=spec, cache_data=True, **tune
        )
        args = _training_args(os.path.join(models, name), steps, config, progress)
        cpu = time.process_time()
        result = train(region, args, print_logs=False)
        result.metrics["cpu_seconds"] = time.process_time() - cpu  # robust to other load on the machine
        return result

    t = stage("2/8", f"pre-training the base model on {config.n_train} captions (all LLM and projector weights)")
    everything = dict(tune_embeddings=True, tune_lm_head=True, tune_norm=True)
    base_run = run("base", init, data["captions"], "all", config.pretrain_steps, **everything)
    base = base_run.output_dir
    timings["pre-training"] = time.perf_counter() - t

    runs = {}
    for key, spec, label in (("region", REGION_SPEC, "visual region"), ("full", "all", "full tuning")):
        t = stage("3/8" if key == "region" else "4/8", f"instruction tuning, {label} ({spec}), {config.steps} steps")
        runs[key] = run(key, base, data["train"], spec, config.steps)
        timings[f"training ({key})"] = time.perf_counter() - t

    def evaluate_saved(name: str) -> Any:
        """Held-out accuracy of ``models/<name>``, loaded back from disk as a user would."""
        model, processor = load_model(os.path.join(models, name))
        return evaluate(
            model,
            processor,
            data["test"],
            data["images"],
            batch_size=32,
            max_new_tokens=8,
            progress=progress,
            out=os.path.join(out, "eval", f"{name}.json"),
            model_id=f"models/{name}",
        )

    t = stage("5/8", f"evaluating base, region and full on {config.n_test} held-out questions")
    evals = {name: evaluate_saved(name) for name in ("base", "region", "full")}
    timings["evaluation"] = time.perf_counter() - t

    t = stage("6/8", f"scoring every layer ({METRIC} distance) on {config.calibration} calibration images")
    scores = {}
    loaded = {}
    for name in ("region", "full"):
        model, processor = load_model(os.path.join(models, name))
        batches = calibration_batches(processor, data["calibration"], data["images"], 16, limit=config.calibration)
        path = os.path.join(out, "scores", f"{name}.json")
        scores[name] = score_layers(model, batches, METRIC, progress=progress, out=path, model_id=name)
        loaded[name] = (model, processor, path)
    timings["scoring"] = time.perf_counter() - t

    t = stage("7/8", f"pruning {config.remove} layers (region model: outside the region only) and re-evaluating")
    pruned = {}
    for name in ("region", "full"):
        model, processor, path = loaded[name]
        # the full model's region is every layer: its lowest-scoring layers go, as ordinary layer pruning would
        pruned[name] = prune_outside_region(model, remove=config.remove, scores=path, allow_region=name == "full")
        save_model(model, processor, os.path.join(models, f"{name}-pruned"))
        evals[f"{name}-pruned"] = evaluate_saved(f"{name}-pruned")
    timings["pruning"] = time.perf_counter() - t

    t = stage("8/8", "writing report.md, layers.png and loss.png")
    prior = answer_prior(data["train"], data["test"])
    rows = _rows(config, runs, evals, pruned)
    removed = {name: record.removed for name, record in pruned.items()}
    plot = _plots(out, config, scores, removed, base_run, runs, _visual_entry(init))
    timings["report"] = time.perf_counter() - t
    seconds = time.perf_counter() - start
    report = _write_report(out, config, rows, evals, scores, removed, prior, timings, seconds, plot, torch)
    summary = {"config": asdict(config), "rows": rows, "answer_prior": prior, "seconds": seconds, "timings": timings}
    write_json(os.path.join(out, "results.json"), summary, indent=1)
    logger.info("done in %.0fs", seconds)
    return DemoResult(out, report, plot, rows, seconds, files={"data": data, "models": models})


def _rows(config: DemoConfig, runs: dict, evals: dict, pruned: dict) -> list:
    """The report's table: one row per model, every number measured."""
    depth = config.num_layers
    region = runs["region"].plan
    kept = {name: f"{len(record.kept)}/{record.original_num_layers}" for name, record in pruned.items()}
    removed = {name: ",".join(map(str, record.removed)) for name, record in pruned.items()}
    return [
        dict(run="base (before instruction tuning)", share=None, seconds=None, cpu_seconds=None,
             accuracy=evals["base"].accuracy, layers=f"{depth}/{depth}"),
        dict(run="full tuning (`all`)", share=runs["full"].plan.trainable_share,
             seconds=runs["full"].metrics["train_runtime"], cpu_seconds=runs["full"].metrics["cpu_seconds"],
             accuracy=evals["full"].accuracy, layers=f"{depth}/{depth}"),
        dict(run=f"visual region (`{REGION_SPEC}`: layers {','.join(map(str, region.layers))})",
             share=region.trainable_share, seconds=runs["region"].metrics["train_runtime"],
             cpu_seconds=runs["region"].metrics["cpu_seconds"], accuracy=evals["region"].accuracy,
             layers=f"{depth}/{depth}"),
        dict(run=f"visual region, pruned (layers {removed['region']} removed)", share=None, seconds=None,
             cpu_seconds=None, accuracy=evals["region-pruned"].accuracy, layers=kept["region"]),
        dict(run=f"full tuning, pruned (layers {removed['full']} removed)", share=None, seconds=None,
             cpu_seconds=None, accuracy=evals["full-pruned"].accuracy, layers=kept["full"]),
    ]  # fmt: skip


def _visual_entry(model_dir: str) -> dict:
    """The demo model's visual-entry layers (none for its Llava; drawn in layers.png where a model has them)."""
    from transformers import AutoConfig

    from .locate import visual_entry_layers

    return visual_entry_layers(AutoConfig.from_pretrained(model_dir))


def _plots(  # noqa: PLR0915 - one figure per block, drawn top to bottom
    out: str, config: DemoConfig, scores: dict, pruned: dict, base_run: Any, runs: dict, entry: Optional[dict] = None
) -> Optional[str]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'vr-plugin[plot]'): layers.png and loss.png skipped")
        return None
    depth = config.num_layers
    region = set(_region(depth))
    layers = list(range(depth))
    colours = ["tab:red" if i in pruned["region"] else "tab:blue" if i in region else "lightgrey" for i in layers]
    figure = Figure(figsize=(8, 4.2), layout="constrained")
    axes = figure.subplots()
    entry = entry or {}
    hatches = ["//" if i in entry else "" for i in layers]  # where images enter the LLM: kept by pruning
    axes.bar(layers, [scores["region"][i] for i in layers], color=colours, edgecolor="black", linewidth=0.5,
             hatch=hatches)  # fmt: skip
    axes.plot(layers, [scores["full"][i] for i in layers], "o--", color="black", markersize=4, linewidth=1)
    for i in pruned["region"]:
        axes.annotate("pruned", (i, scores["region"][i]), ha="center", va="bottom", fontsize=8, color="tab:red")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    axes.legend(
        handles=[
            Patch(color="tab:blue", label=f"visual region ({REGION_SPEC}), trained"),
            Patch(color="lightgrey", label="outside the region, frozen"),
            Patch(color="tab:red", label="outside the region, pruned"),
            Line2D([], [], color="black", marker="o", linestyle="--", markersize=4, label="full-tuning model's score"),
            *(
                [Patch(facecolor="white", edgecolor="black", hatch="//", label="visual-entry layer (kept)")]
                if entry
                else []
            ),
        ],
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=2,
        frameon=False,
    )
    axes.set_xticks(layers)
    axes.set_xlabel("LLM decoder layer (0 = first, next to the embeddings)")
    axes.set_ylabel(f"{METRIC} distance (importance)")
    axes.set_title("LLM depth of the demo model: visual region, layer scores, pruned layers")
    path = os.path.join(out, "layers.png")
    figure.savefig(path, dpi=120)

    figure = Figure(figsize=(8, 3.4), layout="constrained")
    axes = figure.subplots()
    for label, result in (("pre-training (captions)", base_run), ("visual region", runs["region"]),
                          ("full tuning", runs["full"])):  # fmt: skip
        points = [(h["step"], h["loss"]) for h in result.log_history if "loss" in h]
        if points:
            axes.plot(*zip(*points), label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_yscale("log")
    axes.legend(fontsize=8)
    axes.set_title("Training loss")
    figure.savefig(os.path.join(out, "loss.png"), dpi=120)
    return path


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _write_report(
    out: str,
    config: DemoConfig,
    rows: list,
    evals: dict,
    scores: dict,
    pruned: dict,
    prior: float,
    timings: dict,
    seconds: float,
    plot: Optional[str],
    torch: Any,
) -> str:
    depth = config.num_layers
    region = _region(depth)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    lines = [
        "# vr_plugin demo: visual region vs full tuning, then pruning",
        "",
        f"Measured by `vr-plugin demo` on {datetime.date.today().isoformat()} ({platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {threads} torch thread{'' if threads == 1 else 's'}, "
        f"device {device}, torch {torch.__version__}); the whole run took **{seconds:.0f} s**.",
        "",
        f"A small Llava ({depth} LLM decoder layers of width {config.hidden}, a CLIP vision tower kept frozen, an MLP "
        f"projector), pre-trained on captions, then instruction-tuned for {config.steps} steps (batch "
        f"{config.batch_size}, learning rate {config.learning_rate:g}) on {config.n_train} synthetic questions about "
        f"colour, shape, count and position, and evaluated on {config.n_test} held-out ones (exact match).",
        "",
        "| run | trainable share | train time | train CPU time | accuracy | layers kept |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        wall = "—" if row["seconds"] is None else f"{row['seconds']:.1f} s"
        cpu = "—" if row["cpu_seconds"] is None else f"{row['cpu_seconds']:.1f} s"
        lines.append(f"| {row['run']} | {_pct(row['share'])} | {wall} | {cpu} | {_pct(row['accuracy'])} | "
                     f"{row['layers']} |")  # fmt: skip
    lines += [
        "",
        f"Answer-prior baseline (always the most frequent training answer to each question): {_pct(prior)}.",
        "Trainable share: trainable parameters over all parameters of the model (vision tower included). Train "
        "time is wall-clock time (the Trainer's `train_runtime`); train CPU time is this process's CPU time over the "
        "same run, which depends less on other load on the machine.",
        "",
        "## Accuracy per question",
        "",
        "| question | " + " | ".join(evals) + " |",
        "|---|" + "---|" * len(evals),
    ]
    per = {name: _per_question(report) for name, report in evals.items()}
    for question in per["base"]:
        lines.append(f"| {question} | " + " | ".join(_pct(per[name].get(question)) for name in evals) + " |")
    lines += [
        "",
        f"## Layers ({METRIC} distance on {config.calibration} calibration images; higher = more important)",
        "",
        "| layer | visual region | score, region model | score, full model | pruned from |",
        "|---|---|---|---|---|",
    ]
    for i in range(depth):
        where = [name for name in ("region", "full") if i in pruned[name]]
        lines.append(
            f"| {i} | {'yes' if i in region else ''} | {scores['region'][i]:.4f} | {scores['full'][i]:.4f} | "
            f"{', '.join(where)} |"
        )
    if plot:
        lines += ["", "![layers](layers.png)", "", "![loss](loss.png)"]
    else:
        lines += ["", "(matplotlib is not installed: no layers.png / loss.png; `pip install 'vr-plugin[plot]'`)"]
    b, s = config.batch_size, config.steps
    common = f"--images data/images --per_device_train_batch_size {b} --learning_rate {config.learning_rate:g}"
    lines += [
        "",
        "## Time per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {value:.1f} |" for name, value in timings.items()],
        "",
        "## The same with the command line",
        "",
        "```bash",
        f"vr-plugin train --model models/init --data data/captions.json {common} --visual_region all \\",
        f"    --tune_embeddings --tune_lm_head --tune_norm --max_steps {config.pretrain_steps} --output models/base",
        f"vr-plugin train --model models/base --data data/train.json {common} --visual_region {REGION_SPEC} \\",
        f"    --max_steps {s} --output models/region",
        f"vr-plugin train --model models/base --data data/train.json {common} --visual_region all \\",
        f"    --max_steps {s} --output models/full",
        "vr-plugin eval --model models/region --data data/test.json --images data/images",
        f"vr-plugin score --model models/region --data data/calibration.json --images data/images "
        f"--limit {config.calibration} --out scores/region.json",
        f"vr-plugin prune --model models/region --scores scores/region.json --remove {config.remove} "
        "--output models/region-pruned",
        "vr-plugin eval --model models/region-pruned --data data/test.json --images data/images",
        "```",
        "",
        "Per-record predictions are in `eval/`, layer scores in `scores/`, every model in `models/`, all numbers in "
        "`results.json`.",
        "",
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    return path
