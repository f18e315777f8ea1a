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
   visual region (``uniform_0.25``) and with every layer (``all``), same data, steps and learning rate, once per
   training seed (``seeds``, default 3: ``seed``, ``seed + 1``, ...; the later seeds' models are
   ``models/region-seed1``, ...).
5. Held-out accuracy of base and of every region and full model (:func:`vr_plugin.evaluate.evaluate`).
6. ``scores/``: the angular distance of every layer on the calibration prompts (:func:`vr_plugin.score_layers`).
7. ``models/region-pruned``: the lowest-scoring layers outside the region removed
   (:func:`vr_plugin.prune_outside_region`); ``models/full-pruned``: as many of the full model's lowest-scoring layers
   removed, for comparison; the same for every seed. All are reloaded from disk and evaluated.
8. ``report.md`` (the table: mean accuracy and its range over the seeds, and every seed's), ``layers.png`` (the
   LLM's depth: region, scores, pruned layers, of the first seed) and ``loss.png``; the table on the console.

The code reads as these steps: decide (data, model) -> train -> evaluate -> prune (score, prune, re-evaluate) ->
report.

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

from ._logging import quiet_library
from .io import write_json
from .spec import DEFAULT_SPEC

__all__ = ["DemoConfig", "DemoResult", "run_demo", "answer_prior"]

logger = logging.getLogger(__name__)

REGION_SPEC = DEFAULT_SPEC
METRIC = "angular"
KINDS = ("region", "full")  # the headline comparison: the visual region against every layer
SPECS = {"region": REGION_SPEC, "full": "all"}


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
    seeds: int = 3  # the region-vs-full comparison is trained with seeds seed, seed+1, ...: mean and range reported
    threads: int = 1  # the demo's matrices are tiny: one thread is as fast, and immune to oversubscribed cores

    @classmethod
    def quick(cls) -> DemoConfig:
        """A reduced run for the test suite: the whole pipeline in well under a minute."""
        return cls(n_train=96, n_test=24, pretrain_steps=12, steps=8, batch_size=16, calibration=8)

    def validate(self) -> None:
        """Raise ``ValueError`` naming a size that cannot work."""
        sizes = (
            "n_train",
            "n_test",
            "num_layers",
            "hidden",
            "pretrain_steps",
            "steps",
            "batch_size",
            "seeds",
            "threads",
        )
        for name in sizes:
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


def _per_question(reports: list) -> dict:
    """Accuracy per question text over the predictions of ``reports``."""
    groups: dict = collections.defaultdict(list)
    for p in (p for report in reports for p in report.predictions):
        groups[p["question"]].append(p["correct"])
    return {q: sum(v) / len(v) for q, v in groups.items()}


def _training_args(out: str, steps: int, config: DemoConfig, progress: bool, seed: int) -> Any:
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
        seed=seed,
        data_seed=seed,
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
        with quiet_library(keep=logger.name):
            return _run(os.path.abspath(out_dir), config, progress)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Demo:
    """What the demo's steps share: where everything goes, the sizes, the data, the time each stage took."""

    out: str
    config: DemoConfig
    progress: bool
    timings: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    init: str = ""

    @property
    def models(self) -> str:
        return os.path.join(self.out, "models")

    @property
    def seeds(self) -> list:
        return [self.config.seed + i for i in range(self.config.seeds)]

    def name(self, kind: str, seed: int) -> str:
        """``models/<name>`` of a run: ``region`` / ``full`` for the first seed, ``region-seed1`` ... for the others."""
        return kind if seed == self.config.seed else f"{kind}-seed{seed}"

    @contextlib.contextmanager
    def stage(self, number: int, key: str, message: str) -> Iterator[None]:
        """Log ``[number/8] message`` and add the block's wall time to ``timings[key]``."""
        logger.info("[%d/8] %s", number, message)
        start = time.perf_counter()
        yield
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start


def _run(out: str, config: DemoConfig, progress: bool) -> DemoResult:
    """The demo's steps, top to bottom as the report lists them: decide -> train -> evaluate -> prune -> report."""
    start = time.perf_counter()
    demo = _Demo(out, config, progress)
    _decide(demo)
    base_run, runs = _train(demo)
    evals = _evaluate(demo, ["base", *(demo.name(k, s) for s in demo.seeds for k in KINDS)])
    scores, pruned = _prune(demo, evals)
    return _report(demo, base_run, runs, evals, scores, pruned, start)


def _decide(demo: _Demo) -> None:
    """Stage 1: the synthetic data and the initial model (what is compared, on what)."""
    from .synthetic import make_vqa_dataset
    from .tiny import save_tiny_lvlm

    config = demo.config
    os.makedirs(demo.models, exist_ok=True)
    with demo.stage(1, "data and model", f"synthetic VQA set: {config.n_train} train / {config.n_test} test questions"):
        demo.data = make_vqa_dataset(os.path.join(demo.out, "data"), config.n_train, config.n_test, seed=config.seed)
        init = os.path.join(demo.models, "init")
        demo.init = save_tiny_lvlm("llava", init, config.num_layers, config.hidden, seed=config.seed)


def _train_one(demo: _Demo, name: str, source: str, records: str, spec: str, steps: int, seed: int, **tune) -> Any:
    """One ``vr-plugin train`` run into ``models/<name>``, its CPU time measured too."""
    from .training import RegionTrainingConfig, train

    region = RegionTrainingConfig(
        model=source, data=records, images=demo.data["images"], visual_region=spec, cache_data=True, **tune
    )
    args = _training_args(os.path.join(demo.models, name), steps, demo.config, demo.progress, seed)
    cpu = time.process_time()
    result = train(region, args, print_logs=False)
    result.metrics["cpu_seconds"] = time.process_time() - cpu  # robust to other load on the machine
    return result


def _train(demo: _Demo) -> tuple:
    """Stages 2-4: pre-train the base model, then instruction-tune it with the region and in full, once per seed."""
    config, data = demo.config, demo.data
    message = f"pre-training the base model on {config.n_train} captions (all LLM and projector weights)"
    with demo.stage(2, "pre-training", message):
        everything = dict(tune_embeddings=True, tune_lm_head=True, tune_norm=True)
        base_run = _train_one(demo, "base", demo.init, data["captions"], "all", config.pretrain_steps, config.seed,
                              **everything)  # fmt: skip
    runs: dict = {kind: [] for kind in KINDS}
    for number, kind in enumerate(KINDS, 3):
        label = "visual region" if kind == "region" else "full tuning"
        message = f"instruction tuning, {label} ({SPECS[kind]}), {config.steps} steps, seeds {_seeds_text(demo)}"
        with demo.stage(number, f"training ({kind})", message):
            for seed in demo.seeds:
                name = demo.name(kind, seed)
                runs[kind].append(
                    _train_one(demo, name, base_run.output_dir, data["train"], SPECS[kind], config.steps, seed)
                )
    return base_run, runs


def _seeds_text(demo: _Demo) -> str:
    return ", ".join(map(str, demo.seeds))


def _evaluate_saved(demo: _Demo, name: str) -> Any:
    """Held-out accuracy of ``models/<name>``, loaded back from disk as a user would."""
    from .evaluate import evaluate
    from .training import load_model

    model, processor = load_model(os.path.join(demo.models, name))
    return evaluate(
        model,
        processor,
        demo.data["test"],
        demo.data["images"],
        batch_size=32,
        max_new_tokens=8,
        progress=demo.progress,
        out=os.path.join(demo.out, "eval", f"{name}.json"),
        model_id=f"models/{name}",
    )


def _evaluate(demo: _Demo, names: list) -> dict:
    """Stage 5: held-out accuracy of the base model and of every instruction-tuned one."""
    message = f"evaluating base, region and full (seeds {_seeds_text(demo)}) on {demo.config.n_test} held-out questions"
    with demo.stage(5, "evaluation", message):
        return {name: _evaluate_saved(demo, name) for name in names}


def _prune(demo: _Demo, evals: dict) -> tuple:
    """Stages 6-7: score every layer of each tuned model, prune it (region models: outside the region only), save,
    reload and evaluate. Returns ``(scores, pruned)`` keyed by model name; ``evals`` gains the pruned models."""
    from .data import calibration_batches
    from .prune import prune_outside_region
    from .score import score_layers
    from .training import load_model, save_model

    config, data = demo.config, demo.data
    names = [demo.name(kind, seed) for seed in demo.seeds for kind in KINDS]
    scores, loaded = {}, {}
    with demo.stage(
        6, "scoring", f"scoring every layer ({METRIC} distance) on {config.calibration} calibration images"
    ):
        for name in names:
            model, processor = load_model(os.path.join(demo.models, name))
            batches = calibration_batches(processor, data["calibration"], data["images"], 16, limit=config.calibration)
            path = os.path.join(demo.out, "scores", f"{name}.json")
            scores[name] = score_layers(model, batches, METRIC, progress=demo.progress, out=path, model_id=name)
            loaded[name] = (model, processor, path)
    pruned = {}
    message = f"pruning {config.remove} layers (region models: outside the region only) and re-evaluating"
    with demo.stage(7, "pruning", message):
        for name in names:
            model, processor, path = loaded.pop(name)
            # a full model's region is every layer: its lowest-scoring layers go, as ordinary layer pruning would
            full = name.startswith("full")
            pruned[name] = prune_outside_region(model, remove=config.remove, scores=path, allow_region=full)
            save_model(model, processor, os.path.join(demo.models, f"{name}-pruned"))
            evals[f"{name}-pruned"] = _evaluate_saved(demo, f"{name}-pruned")
    return scores, pruned


def _report(demo: _Demo, base_run: Any, runs: dict, evals: dict, scores: dict, pruned: dict, start: float) -> Any:
    """Stage 8: the headline table (mean and range over the seeds), the pictures, report.md and results.json."""
    import torch

    config, out = demo.config, demo.out
    with demo.stage(8, "report", "writing report.md, layers.png and loss.png"):
        prior = answer_prior(demo.data["train"], demo.data["test"])
        rows = _rows(demo, runs, evals, pruned)
        first = {kind: demo.name(kind, config.seed) for kind in KINDS}
        removed = {kind: pruned[first[kind]].removed for kind in KINDS}
        shown = {kind: scores[first[kind]] for kind in KINDS}
        first_runs = {kind: runs[kind][0] for kind in KINDS}
        plot = _plots(out, config, shown, removed, base_run, first_runs, _visual_entry(demo.init))
    seconds = time.perf_counter() - start
    groups = {"base": [evals["base"]]}
    for kind in (*KINDS, *(f"{k}-pruned" for k in KINDS)):
        base_kind = kind.split("-")[0]
        suffix = kind[len(base_kind) :]
        groups[kind] = [evals[demo.name(base_kind, seed) + suffix] for seed in demo.seeds]
    report = _write_report(out, config, rows, groups, shown, removed, prior, demo.timings, seconds, plot, torch)
    summary = {
        "config": asdict(config),
        "seeds": demo.seeds,
        "rows": rows,
        "answer_prior": prior,
        "seconds": seconds,
        "timings": demo.timings,
    }
    write_json(os.path.join(out, "results.json"), summary, indent=1)
    for line in _console_table(rows, len(demo.seeds)):
        logger.info("%s", line)
    logger.info("done in %.0fs", seconds)
    return DemoResult(out, report, plot, rows, seconds, files={"data": demo.data, "models": demo.models})


def _spread(values: list) -> dict:
    """Mean, minimum and maximum of per-seed values."""
    return {"accuracy": sum(values) / len(values), "min": min(values), "max": max(values), "accuracies": values}


def _mean(values: list) -> float:
    return sum(values) / len(values)


def _row(run: str, kind: str, accuracies: list, layers: str, results: Optional[list] = None, **extra: Any) -> dict:
    """One row of the table: accuracy over the seeds; share and (mean) train times where the row was trained."""
    row = dict(run=run, kind=kind, share=None, seconds=None, cpu_seconds=None, **_spread(accuracies), layers=layers)
    if results:
        row["share"] = results[0].plan.trainable_share
        row["seconds"] = _mean([r.metrics["train_runtime"] for r in results])
        row["cpu_seconds"] = _mean([r.metrics["cpu_seconds"] for r in results])
    return {**row, "removed": None, **extra}


def _rows(demo: _Demo, runs: dict, evals: dict, pruned: dict) -> list:
    """The report's table: one row per model, every number measured; tuned ones over every seed."""
    depth = f"{demo.config.num_layers}/{demo.config.num_layers}"
    layers = ",".join(map(str, runs["region"][0].plan.layers))
    names = {kind: [demo.name(kind, seed) for seed in demo.seeds] for kind in KINDS}
    labels = {"full": "full tuning (`all`)", "region": f"visual region (`{REGION_SPEC}`: layers {layers})"}
    rows = [_row("base (before instruction tuning)", "base", [evals["base"].accuracy], depth)]
    for kind in ("full", "region"):
        rows.append(_row(labels[kind], kind, [evals[n].accuracy for n in names[kind]], depth, runs[kind]))
    for kind, label in (("region", "visual region, pruned"), ("full", "full tuning, pruned")):
        record = pruned[names[kind][0]]
        where = "outside the region " if kind == "region" else ""
        rows.append(
            _row(
                f"{label} ({demo.config.remove} layers {where}removed)",
                f"{kind}-pruned",
                [evals[f"{n}-pruned"].accuracy for n in names[kind]],
                f"{len(record.kept)}/{record.original_num_layers}",
                removed=[pruned[n].removed for n in names[kind]],
            )
        )
    return rows


def _range(row: dict) -> str:
    return "—" if len(row["accuracies"]) < 2 else f"{100 * row['min']:.1f}–{100 * row['max']:.1f}%"


def _console_table(rows: list, seeds: int) -> list:
    """The headline comparison as plain text lines for the console."""
    runs = [row["run"].replace("`", "") for row in rows]
    width = max(len(run) for run in runs)
    lines = [f"{'run':<{width}}  {'accuracy':>8}  {f'min-max, {seeds} seeds':<18}  layers"]
    for run, row in zip(runs, rows):
        lines.append(f"{run:<{width}}  {_pct(row['accuracy']):>8}  {_range(row):<18}  {row['layers']}")
    return lines


def _visual_entry(model_dir: str) -> dict:
    """The demo model's visual-entry layers (none for its Llava; drawn in layers.png where a model has them)."""
    from transformers import AutoConfig

    from .locate import visual_entry_layers

    return visual_entry_layers(AutoConfig.from_pretrained(model_dir))


def _plots(
    out: str, config: DemoConfig, scores: dict, pruned: dict, base_run: Any, runs: dict, entry: Optional[dict] = None
) -> Optional[str]:
    """``layers.png`` and ``loss.png`` (of the first seed's runs); ``None`` without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'vr-plugin[plot]'): layers.png and loss.png skipped")
        return None
    path = _layers_figure(Figure, out, config, scores, pruned, entry or {})
    _loss_figure(Figure, out, base_run, runs)
    return path


def _layers_legend(entry: dict) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Patch(color="tab:blue", label=f"visual region ({REGION_SPEC}), trained"),
        Patch(color="lightgrey", label="outside the region, frozen"),
        Patch(color="tab:red", label="outside the region, pruned"),
        Line2D([], [], color="black", marker="o", linestyle="--", markersize=4, label="full-tuning model's score"),
    ]
    if entry:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="visual-entry layer (kept)"))
    return handles


def _layers_figure(figure_class: Any, out: str, config: DemoConfig, scores: dict, pruned: dict, entry: dict) -> str:
    """The LLM's depth: region layers, every layer's score (region and full model), the pruned layers."""
    depth = config.num_layers
    region = set(_region(depth))
    layers = list(range(depth))
    colours = ["tab:red" if i in pruned["region"] else "tab:blue" if i in region else "lightgrey" for i in layers]
    figure = figure_class(figsize=(8, 4.2), layout="constrained")
    axes = figure.subplots()
    hatches = ["//" if i in entry else "" for i in layers]  # where images enter the LLM: kept by pruning
    axes.bar(layers, [scores["region"][i] for i in layers], color=colours, edgecolor="black", linewidth=0.5,
             hatch=hatches)  # fmt: skip
    axes.plot(layers, [scores["full"][i] for i in layers], "o--", color="black", markersize=4, linewidth=1)
    for i in pruned["region"]:
        axes.annotate("pruned", (i, scores["region"][i]), ha="center", va="bottom", fontsize=8, color="tab:red")
    axes.legend(handles=_layers_legend(entry), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                frameon=False)  # fmt: skip
    axes.set_xticks(layers)
    axes.set_xlabel("LLM decoder layer (0 = first, next to the embeddings)")
    axes.set_ylabel(f"{METRIC} distance (importance)")
    axes.set_title("LLM depth of the demo model: visual region, layer scores, pruned layers")
    path = os.path.join(out, "layers.png")
    figure.savefig(path, dpi=120)
    return path


def _loss_figure(figure_class: Any, out: str, base_run: Any, runs: dict) -> str:
    """Training loss of pre-training and of the region and full runs."""
    figure = figure_class(figsize=(8, 3.4), layout="constrained")
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
    path = os.path.join(out, "loss.png")
    figure.savefig(path, dpi=120)
    return path


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _header(config: DemoConfig, seeds: list, seconds: float, torch: Any) -> list:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    return [
        "# vr_plugin demo: visual region vs full tuning, then pruning",
        "",
        f"Measured by `vr-plugin demo` on {datetime.date.today().isoformat()} ({platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {threads} torch thread{'' if threads == 1 else 's'}, "
        f"device {device}, torch {torch.__version__}); the whole run took **{seconds:.0f} s**.",
        "",
        f"A small Llava ({config.num_layers} LLM decoder layers of width {config.hidden}, a CLIP vision tower kept "
        f"frozen, an MLP projector), pre-trained on captions, then instruction-tuned for {config.steps} steps (batch "
        f"{config.batch_size}, learning rate {config.learning_rate:g}) on {config.n_train} synthetic questions about "
        f"colour, shape, count and position, and evaluated on {config.n_test} held-out ones (exact match). Each "
        f"instruction-tuning run, and the pruning after it, is repeated with {len(seeds)} training seeds "
        f"({', '.join(map(str, seeds))}: data order and initialisation of the run); the table gives the mean accuracy "
        "and its range over the seeds (the base model is one model).",
        "",
    ]


def _table(rows: list, seeds: list) -> list:
    """The headline table (mean and min-max over the seeds) and the accuracy of every seed."""
    lines = [
        f"| run | trainable share | train time | train CPU time | accuracy (mean of {len(seeds)}) | min–max | "
        "layers kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        wall = "—" if row["seconds"] is None else f"{row['seconds']:.1f} s"
        cpu = "—" if row["cpu_seconds"] is None else f"{row['cpu_seconds']:.1f} s"
        lines.append(f"| {row['run']} | {_pct(row['share'])} | {wall} | {cpu} | {_pct(row['accuracy'])} | "
                     f"{_range(row)} | {row['layers']} |")  # fmt: skip
    lines += ["", "Accuracy of every seed:", "", "| run | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]  # fmt: skip
    for row in rows[1:]:
        lines.append(f"| {row['run']} | " + " | ".join(_pct(a) for a in row["accuracies"]) + " |")
    return lines


def _per_question_lines(groups: dict) -> list:
    """Accuracy per question, pooled over the seeds of each kind of model."""
    lines = ["## Accuracy per question (pooled over the seeds)", "", "| question | " + " | ".join(groups) + " |",
             "|---|" + "---|" * len(groups)]  # fmt: skip
    per = {kind: _per_question(reports) for kind, reports in groups.items()}
    for question in per["base"]:
        lines.append(f"| {question} | " + " | ".join(_pct(per[kind].get(question)) for kind in groups) + " |")
    return lines


def _layer_lines(config: DemoConfig, scores: dict, pruned: dict) -> list:
    region = _region(config.num_layers)
    lines = [
        f"## Layers ({METRIC} distance on {config.calibration} calibration images; higher = more important; "
        f"seed {config.seed})",
        "",
        "| layer | visual region | score, region model | score, full model | pruned from |",
        "|---|---|---|---|---|",
    ]
    for i in range(config.num_layers):
        where = [name for name in KINDS if i in pruned[name]]
        lines.append(
            f"| {i} | {'yes' if i in region else ''} | {scores['region'][i]:.4f} | {scores['full'][i]:.4f} | "
            f"{', '.join(where)} |"
        )
    return lines


def _command_lines(config: DemoConfig, timings: dict) -> list:
    b, s = config.batch_size, config.steps
    common = f"--images data/images --per_device_train_batch_size {b} --learning_rate {config.learning_rate:g}"
    common += f" --seed {config.seed}"
    return [
        "## Time per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {value:.1f} |" for name, value in timings.items()],
        "",
        f"## The same with the command line (seed {config.seed}; `--seed N` for the others)",
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
        "Per-record predictions are in `eval/`, layer scores in `scores/`, every model in `models/` (the first seed's "
        "as `region`, `full`, ...; the others as `region-seed1`, ...), all numbers in `results.json`.",
        "",
    ]


def _write_report(
    out: str,
    config: DemoConfig,
    rows: list,
    groups: dict,
    scores: dict,
    pruned: dict,
    prior: float,
    timings: dict,
    seconds: float,
    plot: Optional[str],
    torch: Any,
) -> str:
    """``report.md``: the headline table over the seeds, per-question accuracy, the layers, times, commands."""
    seeds = [config.seed + i for i in range(config.seeds)]
    lines = [
        *_header(config, seeds, seconds, torch),
        *_table(rows, seeds),
        "",
        f"Answer-prior baseline (always the most frequent training answer to each question): {_pct(prior)}.",
        "Trainable share: trainable parameters over all parameters of the model (vision tower included). Train "
        "time is wall-clock time (the Trainer's `train_runtime`, mean over the seeds); train CPU time is this "
        "process's CPU time over the same run, which depends less on other load on the machine.",
        "",
        *_per_question_lines(groups),
        "",
        *_layer_lines(config, scores, pruned),
        "",
    ]
    if plot:
        lines += ["![layers](layers.png)", "", "![loss](loss.png)", ""]
    else:
        lines += ["(matplotlib is not installed: no layers.png / loss.png; `pip install 'vr-plugin[plot]'`)", ""]
    lines += _command_lines(config, timings)
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    return path
