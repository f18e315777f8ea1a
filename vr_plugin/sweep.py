"""``vr-plugin sweep``: which region to train, measured on your own model and data.

Every strategy (a region spec: ``uniform_0.25``, the four quarters of the depth, ``all``, ``none``, or any spec of
the grammar) is trained the way ``vr-plugin train`` trains it (same flags, same :func:`vr_plugin.training.train`),
for the same step budget, one run after another into ``OUT/runs/<strategy>``, and evaluated on ``--eval_data``:
the mean token loss of the answers and, where every record ends with an answer, greedy exact-match / option accuracy
(:func:`vr_plugin.evaluate.evaluate`). Steps, top to bottom: plan (every spec checked against the config before
weights load) -> run one -> record (``sweep.json`` rewritten atomically after every run) -> rank -> report
(``report.md``, ``sweep.png``).

A rerun of the same command skips the runs ``sweep.json`` already holds (a killed sweep continues where it stopped;
new strategies are added) and refuses to mix results of other settings, naming what changed. Under ``torchrun`` /
``accelerate launch`` every rank runs the same loop and only the main process writes.

This module imports nothing heavy at import time (torch and transformers are imported inside functions).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ._logging import quiet_library
from .io import write_json
from .spec import DEFAULT_SPEC, describe_indices

__all__ = [
    "DEFAULT_MAX_STEPS",
    "SWEEP_FILE",
    "SweepPlan",
    "SweepResult",
    "budget_flags",
    "default_strategies",
    "eval_loss",
    "rank_runs",
    "run_name",
    "run_sweep",
]

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
REPORT_FILE = "report.md"
PLOT_FILE = "sweep.png"
FORMAT = "vr-plugin sweep"
VERSION = 1
DEFAULT_MAX_STEPS = 100  # per run, unless --max_steps or --num_train_epochs is given
BUDGET_FLAGS = ("--max_steps", "--max-steps", "--num_train_epochs", "--num-train-epochs")
_PER_RUN_ARGUMENTS = ("output_dir", "logging_dir", "run_name")  # differ between runs by construction


@dataclass
class SweepPlan:
    """What a sweep will do, decided before any weights load."""

    out: str
    strategies: list  # region specs, in the order given
    layers: dict  # spec -> selected layer indices
    num_layers: int
    settings: dict  # what must be equal for runs to be compared (sweep.json's "settings")
    hf_args: list  # the TrainingArguments flags of every run (the budget included)
    records: list = field(repr=False)  # training records, every image opened
    eval_records: list = field(repr=False)
    accuracy: bool = True


@dataclass
class SweepResult:
    """Where the sweep wrote its results, and what it recommends."""

    out: str
    results: str
    report: str
    plot: Optional[str]
    ranked: list
    recommended: dict


def default_strategies(num_layers: int, lora: bool = False) -> list:
    """The default grid: the paper's ``uniform_0.25``, the four quarters of the depth, ``all`` and ``none``.

    Quarters are slices of the spec grammar (``0:8``, ``8:16``, ... for 32 layers); empty or repeated ones are left
    out on shallow models. ``none`` (projector only) is left out with ``lora``: LoRA needs region layers.
    """
    bounds = [round(i * num_layers / 4) for i in range(5)]
    quarters = [f"{a}:{b}" for a, b in zip(bounds, bounds[1:]) if b > a]
    grid = [DEFAULT_SPEC, *quarters, "all"] + ([] if lora else ["none"])
    return list(dict.fromkeys(grid))


def budget_flags(hf_args: list) -> list:
    """``hf_args`` with ``--max_steps DEFAULT_MAX_STEPS`` in front unless a step or epoch budget is given."""
    given = any(a.split("=", 1)[0] in BUDGET_FLAGS for a in hf_args)
    return list(hf_args) if given else ["--max_steps", str(DEFAULT_MAX_STEPS), *hf_args]


def run_name(spec: str) -> str:
    """The folder name of a strategy's run: the spec itself where it is a safe name, else a cleaned one + hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.") or "run"
    return safe if safe == spec else f"{safe}-{hashlib.sha1(spec.encode()).hexdigest()[:6]}"


# ------------------------------------------------------------------------------------------------------ plan


def _json_value(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, unknown objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def _local(path: Optional[str]) -> Optional[str]:
    return os.path.abspath(path) if path and os.path.exists(path) else path


def _settings(args: argparse.Namespace, config: Any, hf_args: list) -> dict:
    """What a result depends on besides the strategy: the train flags, the changed TrainingArguments, evaluation."""
    from .cli import training_arguments_from

    train = {k: v for k, v in asdict(config).items() if k != "visual_region"}
    train.update({k: _local(train[k]) for k in ("model", "data", "images")})
    given = training_arguments_from(hf_args, "run").to_dict()
    default = training_arguments_from([], "run").to_dict()
    changed = {k: v for k, v in given.items() if k not in _PER_RUN_ARGUMENTS and v != default.get(k)}
    evaluation = {
        "eval_data": _local(args.eval_data),
        "eval_images": _local(args.eval_images or args.images),
        "eval_batch_size": args.eval_batch_size,
        "max_new_tokens": args.max_new_tokens,
        "eval_limit": args.eval_limit,
        "accuracy": not args.no_accuracy,
    }
    return _json_value({"train": train, "training_arguments": changed, "eval": evaluation})


def _check_strategies(args: argparse.Namespace, num_layers: int, lora: bool) -> dict:
    """``{spec: layers}`` of ``--strategies`` (else the default grid), each checked against the model's config."""
    from .region import check_region_spec

    strategies = list(dict.fromkeys(args.strategies or default_strategies(num_layers, lora)))
    layers = {spec: check_region_spec(args.model, spec, option="--strategies") for spec in strategies}
    empty = [spec for spec, selected in layers.items() if not selected]
    if lora and empty:
        raise ValueError(
            f"--strategies {' '.join(empty)} selects no layer, and --lora puts adapters on region layers only: "
            "drop it, or sweep without --lora"
        )
    return layers


def _eval_records(args: argparse.Namespace) -> tuple:
    """The evaluation records (every image opened) and whether they can be scored for accuracy."""
    from .data import validate_conversations
    from .evaluate import qa_records

    if not os.path.isfile(args.eval_data):
        raise FileNotFoundError(f"--eval_data {args.eval_data!r} does not exist")
    images = args.eval_images or args.images
    records, skipped = validate_conversations(args.eval_data, images, args.skip_bad_images)
    if skipped:
        logger.warning("skipped %d records of %s with unreadable images", skipped, args.eval_data)
    records = records[: args.eval_limit] if args.eval_limit else records
    if args.no_accuracy:
        return records, False
    try:
        qa_records(records, source=args.eval_data)
    except ValueError as error:
        logger.warning("no accuracy: %s (the eval loss still ranks the strategies)", error)
        return records, False
    return records, True


def plan_sweep(args: argparse.Namespace, hf_args: list) -> SweepPlan:
    """Check every input (flags, specs, data, evaluation data) before any weights load; return the plan."""
    from transformers import AutoConfig

    from .cli import training_arguments_from, training_config_from
    from .data import validate_conversations
    from .locate import num_layers_from_config

    for flag in ("eval_batch_size", "max_new_tokens", "eval_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.tolerance < 1:
        raise ValueError(f"--tolerance must be in [0, 1), got {args.tolerance}")
    config = training_config_from(args, visual_region="none")
    hf_args = budget_flags(hf_args)
    if training_arguments_from(hf_args, args.output).resume_from_checkpoint:
        raise ValueError("--resume_from_checkpoint does not apply to a sweep: rerun the same command to continue it")
    num_layers = num_layers_from_config(AutoConfig.from_pretrained(args.model))
    layers = _check_strategies(args, num_layers, config.lora)
    eval_records, accuracy = _eval_records(args)
    records, skipped = validate_conversations(args.data, args.images, args.skip_bad_images)
    if skipped:
        logger.warning("skipped %d records of %s with unreadable images", skipped, args.data)
    settings = _settings(args, config, hf_args)
    return SweepPlan(args.output, list(layers), layers, num_layers, settings, hf_args, records, eval_records, accuracy)


# ------------------------------------------------------------------------------------------------------ resume


def _differences(old: dict, new: dict) -> list:
    """``--flag old -> new`` for every setting that differs between two ``settings`` dicts."""
    changes = []
    for section in sorted(set(old) | set(new)):
        before, after = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(before) | set(after)):
            if before.get(key, "(default)") != after.get(key, "(default)"):
                changes.append(f"--{key} {before.get(key, '(default)')!r} -> {after.get(key, '(default)')!r}")
    return changes


def finished_runs(plan: SweepPlan, overwrite: bool) -> list:
    """The runs an earlier sweep into ``plan.out`` finished with the same settings (``[]`` for a new sweep).

    Raises ``ValueError`` naming what changed when ``sweep.json`` holds results of other settings.
    """
    path = os.path.join(plan.out, SWEEP_FILE)
    if overwrite or not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        previous = json.load(handle)
    if previous.get("format") != FORMAT:
        raise ValueError(f"{path} is no {FORMAT} results file; choose a new --output")
    changes = _differences(previous.get("settings", {}), plan.settings)
    if changes:
        shown = "; ".join(changes[:5]) + ("; ..." if len(changes) > 5 else "")
        raise ValueError(
            f"{path} holds results of other settings ({shown}): rerun with the same settings to continue that sweep, "
            "pass --overwrite_output_dir to start over, or choose a new --output"
        )
    return list(previous.get("runs", []))


# ------------------------------------------------------------------------------------------------------ one run


def eval_loss(
    model: Any,
    processor: Any,
    records: list,
    image_folder: Optional[str],
    *,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    source: Optional[str] = None,
) -> tuple:
    """``(loss, tokens)``: the mean cross-entropy of ``model`` on the assistant tokens of ``records``.

    The records are encoded as for training (:class:`vr_plugin.data.ConversationDataset`, labels on the assistant
    turns only); the mean is over every labelled token of the whole set, not over batches.
    """
    import torch

    from .data import IGNORE_INDEX, Collator, ConversationDataset, batch_to_model

    dataset = ConversationDataset(records, image_folder, processor, max_length=max_length, source=source)
    collator = Collator(processor)
    was_training, total, tokens = model.training, 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, len(dataset), batch_size):
                batch = collator([dataset[i] for i in range(first, min(first + batch_size, len(dataset)))])
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the tokens the shifted loss averages over
                if count:
                    total += float(model(**batch_to_model(batch, model)).loss) * count
                    tokens += count
    finally:
        model.train(was_training)
    if not tokens:
        raise ValueError(f"{source or 'the evaluation data'} has no answer token to compute a loss on")
    return total / tokens, tokens


def _evaluate_run(args: argparse.Namespace, plan: SweepPlan, run_dir: str, device: str, main: bool) -> dict:
    """Eval loss (and accuracy) of the model a run saved, loaded back from disk as a user would."""
    from .evaluate import evaluate
    from .training import DTYPES, load_model

    start = time.perf_counter()
    model, processor = load_model(run_dir, dtype=DTYPES[args.dtype], device=device)
    images = args.eval_images or args.images
    loss, tokens = eval_loss(
        model, processor, plan.eval_records, images, batch_size=args.eval_batch_size, source=args.eval_data
    )
    row: dict = {"eval_loss": loss, "eval_tokens": tokens, "eval_records": len(plan.eval_records)}
    row.update(accuracy=None, correct=None)
    if plan.accuracy:
        report = evaluate(
            model, processor, plan.eval_records, images, batch_size=args.eval_batch_size,
            max_new_tokens=args.max_new_tokens, progress=False, source=args.eval_data, model_id=run_dir,
            out=os.path.join(run_dir, "eval_predictions.json") if main else None,
        )  # fmt: skip
        row.update(accuracy=report.accuracy, correct=report.correct)
    row["eval_seconds"] = time.perf_counter() - start
    return row


def run_one(args: argparse.Namespace, plan: SweepPlan, spec: str, out: str, main: bool) -> dict:
    """Train strategy ``spec`` into ``out/runs/<name>`` as ``vr-plugin train`` would, evaluate it; its result row."""
    import gc

    from .cli import training_arguments_from, training_config_from
    from .outputs import writing
    from .training import train

    relative = os.path.join("runs", run_name(spec))
    run_dir = os.path.join(out, relative)
    if main and os.path.isdir(run_dir):  # an unfinished run of a killed sweep (finished ones are in sweep.json)
        shutil.rmtree(run_dir)
    config = training_config_from(args, visual_region=spec)
    training_args = training_arguments_from(plan.hf_args, run_dir)
    with writing(run_dir, f"vr-plugin sweep ({spec})", main_process=main):
        result = train(config, training_args, print_logs=False, records=plan.records)
    gc.collect()  # the Trainer and its model, before the saved model is loaded for evaluation
    trained = result.plan
    row = {
        "strategy": spec,
        "layers": list(trained.layers),
        "num_layers": trained.num_layers,
        "run_dir": relative,
        "trainable": trained.trainable,
        "total": trained.total,
        "trainable_share": trained.trainable_share,
        "steps": max((h.get("step", 0) for h in result.log_history), default=0),
        "train_loss": result.metrics.get("train_loss"),
        "train_seconds": result.metrics.get("train_runtime"),
    }
    row.update(_evaluate_run(args, plan, run_dir, str(training_args.device), main))
    row["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return row


# ------------------------------------------------------------------------------------------------------ record


def record_runs(out: str, plan: SweepPlan, runs: list) -> str:
    """Write ``sweep.json`` (format, settings, depth, this command's strategies, every finished run) atomically."""
    data = {
        "format": FORMAT,
        "version": VERSION,
        "settings": plan.settings,
        "num_layers": plan.num_layers,
        "strategies": plan.strategies,
        "runs": runs,
    }
    return write_json(os.path.join(out, SWEEP_FILE), _json_value(data), indent=1)


# ------------------------------------------------------------------------------------------------------ rank


def rank_runs(runs: list, tolerance: float = 0.01) -> tuple:
    """``(ranked, recommended)``: runs by eval loss (lower first; ties: higher accuracy, smaller trainable share),
    and the run to train.

    The recommendation is the run with the smallest trainable share whose eval loss is within ``tolerance``
    (relative) of the best and, where accuracy was measured, whose accuracy is within ``tolerance`` (absolute) of the
    best: a region that does as well as the best strategy for less. Falls back to the top-ranked run.
    """
    if not runs:
        raise ValueError("no finished run to rank")
    ranked = sorted(runs, key=lambda r: (r["eval_loss"], -(r.get("accuracy") or 0.0), r["trainable_share"]))
    best_loss = ranked[0]["eval_loss"]
    accuracies = [r["accuracy"] for r in runs if r.get("accuracy") is not None]
    best_accuracy = max(accuracies) if accuracies else None

    def good(run: dict) -> bool:
        near_loss = run["eval_loss"] <= best_loss + tolerance * abs(best_loss)
        near_accuracy = best_accuracy is None or (run.get("accuracy") or 0.0) >= best_accuracy - tolerance
        return near_loss and near_accuracy

    candidates = [r for r in ranked if good(r)] or ranked[:1]
    recommended = min(candidates, key=lambda r: (r["trainable_share"], ranked.index(r)))
    return ranked, recommended


# ------------------------------------------------------------------------------------------------------ report


def _layers_text(run: dict) -> str:
    return describe_indices(run["layers"]) if run["layers"] else "none"


def recommendation_line(run: dict) -> str:
    """The report's last line: ``train this region: <spec> (layers ...)``."""
    return f"train this region: {run['strategy']} (layers {_layers_text(run)})"


def table(ranked: list) -> list:
    """The ranked table as markdown lines (also what the console shows)."""
    lines = [
        "| rank | strategy | layers | trainable share | train time | train loss | eval loss | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rank, run in enumerate(ranked, 1):
        accuracy = "—" if run.get("accuracy") is None else f"{100 * run['accuracy']:.1f}%"
        train_loss = "—" if run.get("train_loss") is None else f"{run['train_loss']:.4f}"
        lines.append(
            f"| {rank} | `{run['strategy']}` | {_layers_text(run)} ({len(run['layers'])}/{run['num_layers']}) | "
            f"{100 * run['trainable_share']:.2f}% | {run['train_seconds']:.1f} s | {train_loss} | "
            f"{run['eval_loss']:.4f} | {accuracy} |"
        )
    return lines


def write_report(
    out: str, plan: SweepPlan, ranked: list, recommended: dict, plot: Optional[str], tolerance: float
) -> str:
    """``report.md``: what was swept, the ranked table, the plot, and the region to train (its last line)."""
    train, evaluation = plan.settings["train"], plan.settings["eval"]
    changed = plan.settings["training_arguments"]
    flags = " ".join(f"--{k} {v}" for k, v in sorted(changed.items())) or "(TrainingArguments defaults)"
    accuracy = "exact-match / option accuracy of greedy answers" if plan.accuracy else "no accuracy (see the log)"
    lines = [
        "# vr-plugin sweep: which region to train",
        "",
        f"Model `{train['model']}` ({plan.num_layers} LLM decoder layers), trained on `{train['data']}` "
        f"({len(plan.records)} records) with every strategy for the same budget and settings: {flags}. Evaluated "
        f"on `{evaluation['eval_data']}` ({len(plan.eval_records)} records): the mean loss of the answer tokens, and "
        f"{accuracy}. Measured {datetime.date.today().isoformat()}; results in `{SWEEP_FILE}`, runs in `runs/`.",
        "",
        *table(ranked),
        "",
        "Ranked by eval loss (lower is better). Trainable share: trainable parameters over all parameters. The "
        f"recommendation is the strategy with the smallest trainable share whose eval loss is within {tolerance:g} "
        "(relative) of the best and whose accuracy, where measured, is within "
        f"{100 * tolerance:g} points of the best (`--tolerance`).",
        "",
        f"![sweep]({PLOT_FILE})"
        if plot
        else "(matplotlib is not installed: no sweep.png; `pip install vr-plugin[plot]`)",
        "",
        recommendation_line(recommended),
        "",
    ]
    path = os.path.join(out, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    return path


def plot_sweep(out: str, ranked: list, num_layers: int, recommended: Optional[dict] = None) -> Optional[str]:
    """``sweep.png``: each strategy's layers (rows, best first) beside its eval loss (the recommended one in orange);
    ``None`` without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'vr-plugin[plot]'): sweep.png skipped")
        return None
    figure = Figure(figsize=(10, 0.5 * len(ranked) + 1.6), layout="constrained")
    grid, bars = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]}, sharey=True)
    cells = [[1.0 if i in set(run["layers"]) else 0.0 for i in range(num_layers)] for run in ranked]
    grid.imshow(cells, cmap="Blues", vmin=0, vmax=1.25, aspect="auto")
    grid.set_yticks(range(len(ranked)), [run["strategy"] for run in ranked])
    grid.set_xticks(range(num_layers))
    grid.set_xlabel("LLM decoder layer (trained: blue)")
    grid.set_title("strategies, best first")
    colours = ["tab:orange" if run is recommended else "tab:blue" for run in ranked]
    bars.barh(range(len(ranked)), [run["eval_loss"] for run in ranked], color=colours)
    for row, run in enumerate(ranked):
        if run.get("accuracy") is not None:
            bars.annotate(f" {100 * run['accuracy']:.1f}%", (run["eval_loss"], row), va="center", fontsize=8)
    bars.set_xlabel("eval loss (accuracy beside each bar)")
    bars.set_title("recommended: orange")
    path = os.path.join(out, PLOT_FILE)
    figure.savefig(path, dpi=120)
    return path


# ------------------------------------------------------------------------------------------------------ sweep


def _progress(total: int, done: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="sweep", unit="run", disable=not enabled)


def _report(out: str, plan: SweepPlan, runs: list, tolerance: float) -> SweepResult:
    """Rank every finished run of the sweep (earlier commands' strategies too), write the plot and report.md."""
    ranked, recommended = rank_runs(runs, tolerance)
    plot = plot_sweep(out, ranked, plan.num_layers, recommended)
    report = write_report(out, plan, ranked, recommended, plot, tolerance)
    return SweepResult(out, os.path.join(out, SWEEP_FILE), report, plot, ranked, recommended)


def run_sweep(args: argparse.Namespace, hf_args: list) -> SweepResult:
    """``vr-plugin sweep``: plan, train and evaluate every strategy not yet in ``sweep.json``, rank, report."""
    from .backends.processes import is_main_process
    from .outputs import check_output, writing

    plan = plan_sweep(args, hf_args)
    main = is_main_process()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    runs = finished_runs(plan, args.overwrite_output_dir)
    resuming = os.path.isfile(os.path.join(plan.out, SWEEP_FILE)) and not args.overwrite_output_dir
    check_output(plan.out, inputs=[args.model], overwrite=args.overwrite_output_dir or resuming)
    replace = args.overwrite_output_dir and os.path.isdir(plan.out) and bool(os.listdir(plan.out))
    if replace and distributed:
        raise ValueError(f"--overwrite_output_dir under a launcher: remove {plan.out!r} first or choose a new --output")
    done = {r["strategy"] for r in runs}
    todo = [spec for spec in plan.strategies if spec not in done]
    if done & set(plan.strategies):
        logger.info("sweep: %d of %d runs already in %s", len(plan.strategies) - len(todo), len(plan.strategies),
                    os.path.join(plan.out, SWEEP_FILE))  # fmt: skip
    with writing(plan.out, "vr-plugin sweep", replace=replace, main_process=main) as target:
        if main:
            record_runs(target, plan, runs)
        with _progress(len(plan.strategies), len(plan.strategies) - len(todo), main and not args.no_progress) as bar:
            for spec in todo:
                bar.set_postfix_str(spec)
                with contextlib.nullcontext() if getattr(args, "verbose", False) else quiet_library():
                    runs.append(run_one(args, plan, spec, target, main))
                if main:
                    record_runs(target, plan, runs)
                bar.update(1)
        result = _report(target, plan, runs, args.tolerance) if main else None
    if result is None:
        return SweepResult(plan.out, "", "", None, [], {})
    return SweepResult(
        plan.out,
        os.path.join(plan.out, SWEEP_FILE),
        os.path.join(plan.out, REPORT_FILE),
        os.path.join(plan.out, PLOT_FILE) if result.plot else None,
        result.ranked,
        result.recommended,
    )
