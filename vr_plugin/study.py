"""``vr-plugin study``: the paper's layer-selection comparison on the built-in synthetic setting, seeded and paired.

The pipeline, one function per stage:

1. :func:`plan_strategies`: the strategies, each a region spec of the normal grammar (post-hoc ones become an
   explicit index list per seed): ``uniform_<r>``, the four consecutive quarters, bottom+top, ``random_<r>_seed<d>``,
   top-k by weight change / Block Influence / angular distance of the full-tuning run, ``all``, ``none``, and a
   ratio sweep of ``uniform``.
2. :func:`build_base`, once per seed: a small Llava (:func:`vr_plugin.tiny.save_tiny_lvlm`) pre-trained on captions
   and on a text-only task (:func:`vr_plugin.synthetic.make_text_dataset`: sums with exact answers), every LLM and
   projector weight learning; then an alignment stage (projector only, LLM frozen), as LLaVA does.
3. :func:`run_strategy`: visual instruction tuning from that base through :class:`vr_plugin.RegionTrainer` with
   :class:`vr_plugin.RegionFreezeCallback` (same base, data order, steps and learning rate for every strategy of a
   seed), then held-out visual accuracy, text-task accuracy relative to the base (retention), trainable share, train
   time, and which tensors changed.
4. :func:`prune_and_measure`: angular scores, the lowest-scoring layers outside the region removed
   (:func:`vr_plugin.prune_outside_region`), measured again.
5. :func:`aggregate`: mean and 95% t-interval over seeds, paired differences to full tuning, ranking.
6. :func:`write_report`: ``report.md`` beside the paper's own figures, ``results.json`` (every run), plots.

Every number depends only on the seed (one torch thread per process, seeds everywhere): the same seed gives the
same numbers, whichever ``jobs`` ran them; only the timings vary. Importing this module imports no torch.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ._logging import quiet_library
from .io import write_json

__all__ = [
    "StudyConfig",
    "Strategy",
    "plan_strategies",
    "build_base",
    "run_strategy",
    "prune_and_measure",
    "run_seed",
    "aggregate",
    "mean_ci",
    "t_quantile",
    "write_report",
    "run_study",
]

logger = logging.getLogger(__name__)

POSTHOC_METRICS = {"weight_change": "weight change", "bi": "Block Influence", "angular": "angular distance"}
PRUNE_METRIC = "angular"
FULL = "all"


@dataclass
class StudyConfig:
    """Sizes of the study; the defaults finish in about 20 minutes on 2 free CPU cores."""

    seeds: int = 5
    seed: int = 0  # the seeds are seed, seed + 1, ...
    num_layers: int = 8
    hidden: int = 64
    n_train: int = 512
    n_test: int = 200
    max_operand: int = 10  # the text task: every a + b with a, b < max_operand
    text_repeats: int = 3
    pretrain_steps: int = 300
    align_steps: int = 60
    steps: int = 120
    batch_size: int = 32
    learning_rate: float = 2e-3
    region: float = 0.25
    ratios: list = field(default_factory=lambda: [0.125, 0.25, 0.5, 0.75])
    random_draws: int = 3
    remove: int = 2
    calibration: int = 32
    jobs: int = 2
    threads: int = 1

    @classmethod
    def quick(cls) -> StudyConfig:
        """The whole pipeline in well under a minute, for the test suite: the base learns its few sums, the rest is
        too small to mean anything."""
        return cls(seeds=2, hidden=32, n_train=32, n_test=12, max_operand=2, text_repeats=8, pretrain_steps=40,
                   align_steps=2, steps=2, batch_size=8, learning_rate=1e-2, calibration=4, jobs=1)  # fmt: skip

    def validate(self) -> None:
        """Raise ``ValueError`` naming a size that cannot work, before anything is built."""
        for name in ("seeds", "n_train", "n_test", "max_operand", "text_repeats", "pretrain_steps", "align_steps",
                     "steps", "batch_size", "random_draws", "calibration", "jobs", "threads"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"study {name} must be >= 1, got {getattr(self, name)}")
        if self.seeds < 2:
            raise ValueError(f"study seeds must be >= 2 for a 95% interval, got {self.seeds}")
        if self.num_layers < 4 or self.num_layers % 4:
            raise ValueError(f"study num_layers must be a multiple of 4 (four quarters), got {self.num_layers}")
        if self.hidden % 8:
            raise ValueError(f"study hidden must be a multiple of 8, got {self.hidden}")
        for ratio in [self.region, *self.ratios]:
            if not 0 < ratio < 1:
                raise ValueError(f"study ratios must lie in (0, 1) (all and none are run anyway), got {ratio}")
        if not 0 <= self.remove < self.num_layers:
            raise ValueError(f"study remove must be in [0, {self.num_layers - 1}], got {self.remove}")


@dataclass(frozen=True)
class Strategy:
    """One row of the comparison: a region spec, or a post-hoc score whose top-k layers make one per seed."""

    name: str
    group: str
    label: str
    spec: Optional[str] = None
    metric: Optional[str] = None


def _ratio(value: float) -> str:
    return repr(float(value))  # 0.25 -> '0.25', always with a decimal point (a fraction, not a layer count)


def plan_strategies(config: StudyConfig) -> list:
    """Every strategy of the study, in the report's order (``all`` first: the post-hoc ones need its run)."""
    from .spec import region_size, select_layers

    depth, r = config.num_layers, _ratio(config.region)
    k = region_size(r, depth)
    q = depth // 4
    bottom = list(range(k // 2))
    hybrid = ",".join(map(str, bottom + list(range(depth - (k - len(bottom)), depth))))
    plan = [
        Strategy(FULL, "reference", "full tuning (all layers)", FULL),
        Strategy(f"uniform_{r}", "paper", "sparse & uniform (the paper's visual region)", f"uniform_{r}"),
        Strategy("first_0.25", "consecutive", "consecutive, bottom quarter", "first_0.25"),
        Strategy(f"{q}:{2 * q}", "consecutive", "consecutive, mid-bottom quarter", f"{q}:{2 * q}"),
        Strategy(f"{2 * q}:{3 * q}", "consecutive", "consecutive, mid-top quarter", f"{2 * q}:{3 * q}"),
        Strategy("last_0.25", "consecutive", "consecutive, top quarter", "last_0.25"),
        Strategy(hybrid, "hybrid", "hybrid, bottom + top", hybrid),
        *[
            Strategy(f"random_{r}_seed{d}", "random", f"random draw {d}", f"random_{r}_seed{d}")
            for d in range(1, config.random_draws + 1)
        ],  # fmt: skip
        *[
            Strategy(f"posthoc_{m}", "post-hoc", f"post-hoc top-{k} by {label}", metric=m)
            for m, label in POSTHOC_METRICS.items()
        ],  # fmt: skip
        Strategy("none", "reference", "projector only (no LLM layer)", "none"),
    ]
    for ratio in config.ratios:
        name = f"uniform_{_ratio(ratio)}"
        if all(s.name != name for s in plan):
            plan.append(Strategy(name, "ratio", f"sparse & uniform, {100 * ratio:g}%", name))
    for strategy in plan:
        if strategy.spec is not None:
            select_layers(strategy.spec, depth)  # a bad spec fails here, before anything is built
    return plan


# ------------------------------------------------------------------------------------------------ one seed


def _arguments(out: str, steps: int, config: StudyConfig, seed: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=0.0,
        warmup_steps=max(1, steps // 10),
        lr_scheduler_type="linear",
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        label_names=["labels"],
    )


def make_data(out: str, config: StudyConfig) -> dict:
    """The synthetic VQA set, the text task and their mixture for pre-training (the same for every seed)."""
    import json

    from .synthetic import make_text_dataset, make_vqa_dataset

    data = make_vqa_dataset(out, config.n_train, config.n_test, seed=0)
    data.update(make_text_dataset(out, config.max_operand, seed=0, repeats=config.text_repeats))
    records = []
    for key in ("captions", "text_train"):
        with open(data[key], encoding="utf-8") as handle:
            records += json.load(handle)
    data["pretrain"] = os.path.join(out, "pretrain.json")
    with open(data["pretrain"], "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=1)
    return data


def build_base(config: StudyConfig, seed: int, data: dict, models: str) -> dict:
    """The base of one seed: a tiny Llava pre-trained (captions + text task, all LLM and projector weights), then
    aligned (projector only, on the captions). Returns where it is and what each stage took."""
    from .tiny import save_tiny_lvlm
    from .training import RegionTrainingConfig, train

    init = save_tiny_lvlm("llava", os.path.join(models, "init"), config.num_layers, config.hidden, seed=seed)
    everything = dict(tune_embeddings=True, tune_lm_head=True, tune_norm=True)
    stages = (("pretrain", init, data["pretrain"], FULL, config.pretrain_steps, everything),
              ("base", os.path.join(models, "pretrain"), data["captions"], "none", config.align_steps, {}))  # fmt: skip
    info: dict = {"seed": seed}
    for name, source, records, spec, steps, tune in stages:
        region = RegionTrainingConfig(
            model=source, data=records, images=data["images"], visual_region=spec, cache_data=True, **tune
        )
        cpu = time.process_time()
        result = train(region, _arguments(os.path.join(models, name), steps, config, seed), print_logs=False)
        info[f"{name}_seconds"] = result.metrics["train_runtime"]
        info[f"{name}_cpu_seconds"] = time.process_time() - cpu
        info[f"{name}_loss"] = result.metrics.get("train_loss")
    info["dir"] = os.path.join(models, "base")
    return info


@dataclass
class SeedContext:
    """What every strategy of one seed shares: the base, the encoded data, the evaluation sets."""

    config: StudyConfig
    seed: int
    base_dir: str
    runs_dir: str
    processor: Any
    dataset: Any
    images: str
    visual: list
    text: list
    calibration: list
    base_state: dict = field(repr=False, default_factory=dict)
    base_text: float = 0.0
    base_visual: float = 0.0


def _context(config: StudyConfig, seed: int, data: dict, base_dir: str, runs_dir: str) -> SeedContext:
    import torch

    from .data import ConversationDataset, calibration_batches, load_processor, validate_conversations
    from .model_io import load_plain

    processor = load_processor(base_dir)
    records, _ = validate_conversations(data["train"], data["images"])
    dataset = ConversationDataset(records, data["images"], processor, cache=True, source=data["train"])
    visual, _ = validate_conversations(data["test"], data["images"])
    text, _ = validate_conversations(data["text_test"], None)
    calibration = list(
        calibration_batches(processor, data["calibration"], data["images"], 16, limit=config.calibration)
    )
    ctx = SeedContext(config, seed, base_dir, runs_dir, processor, dataset, data["images"], visual, text, calibration)
    base = load_plain(base_dir, torch.float32).eval()
    ctx.base_state = {name: p.detach().clone() for name, p in base.named_parameters()}
    ctx.base_visual, ctx.base_text = measure(ctx, base)
    return ctx


def measure(ctx: SeedContext, model: Any) -> tuple:
    """``(visual accuracy, text accuracy)`` of ``model``: held-out questions, and the text task."""
    from .evaluate import evaluate

    common = dict(batch_size=100, max_new_tokens=4, progress=False)
    visual = evaluate(model, ctx.processor, ctx.visual, ctx.images, source="test.json", **common)
    text = evaluate(model, ctx.processor, ctx.text, None, source="text_test.json", **common)
    return visual.accuracy, text.accuracy


def changed_parts(model: Any, base_state: dict) -> tuple:
    """``(decoder layers, other parameter groups)`` whose tensors differ from the base's."""
    import torch

    from .locate import map_parameters

    layers, groups = set(), set()
    for info in map_parameters(model):
        if torch.equal(info.param.detach(), base_state[info.name]):
            continue
        if info.group == "layer":
            layers.add(info.layer)
        else:
            groups.add(info.group)
    return sorted(layers), sorted(groups)


def trainable_layers(model: Any) -> list:
    """The decoder layers with a parameter that requires grad."""
    from .locate import map_parameters

    return sorted({i.layer for i in map_parameters(model) if i.group == "layer" and i.param.requires_grad})


def run_strategy(ctx: SeedContext, name: str, spec: str) -> tuple:
    """Visual instruction tuning of the seed's base with region ``spec``; returns ``(run record, tuned model)``."""
    import torch
    import transformers
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .callback import RegionFreezeCallback
    from .data import Collator
    from .model_io import load_plain
    from .training import RegionTrainer

    transformers.set_seed(ctx.seed)
    model = load_plain(ctx.base_dir, torch.float32)
    callback = RegionFreezeCallback(spec, tune_vision_tower=False, tune_projector=True)
    out = os.path.join(ctx.runs_dir, name.replace(":", "-").replace(",", "_"))
    trainer = RegionTrainer(
        model=model,
        args=_arguments(out, ctx.config.steps, ctx.config, ctx.seed),
        train_dataset=ctx.dataset,
        data_collator=Collator(ctx.processor),
        processing_class=ctx.processor,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    cpu = time.process_time()
    result = trainer.train()
    cpu = time.process_time() - cpu
    plan = callback.plan
    trained = trainable_layers(model)
    changed, groups = changed_parts(model, ctx.base_state)
    visual, text = measure(ctx, model)
    record = dict(seed=ctx.seed, strategy=name, spec=spec, layers=list(plan.layers),
                  trainable_layers=trained,
                  changed_layers=changed, changed_groups=groups, trainable_params=plan.trainable,
                  total_params=plan.total, trainable_share=plan.trainable_share,
                  train_loss=result.metrics.get("train_loss"), train_seconds=result.metrics["train_runtime"],
                  train_cpu_seconds=cpu, visual_accuracy=visual, text_accuracy=text,
                  retention=_ratio_of(text, ctx.base_text))  # fmt: skip
    return record, model


def _ratio_of(value: float, reference: float) -> Optional[float]:
    return value / reference if reference else None


def prune_and_measure(ctx: SeedContext, model: Any, spec: str) -> dict:
    """Remove ``config.remove`` layers outside the region (``all``: any layers) by angular distance, then measure."""
    from .prune import prune_outside_region
    from .score import score_layers
    from .spec import select_layers

    depth = ctx.config.num_layers
    full = spec == FULL
    outside = depth - len(select_layers(spec, depth))
    remove = ctx.config.remove if full else min(ctx.config.remove, outside)
    scores = score_layers(model, ctx.calibration, PRUNE_METRIC, progress=False)
    record = prune_outside_region(model, region=spec, remove=remove, scores=scores, allow_region=full)
    visual, text = measure(ctx, model)
    return dict(removed=list(record.removed), kept=len(record.kept), visual_accuracy=visual, text_accuracy=text,
                retention=_ratio_of(text, ctx.base_text))  # fmt: skip


def posthoc_specs(ctx: SeedContext, full_model: Any, k: int) -> dict:
    """Top-``k`` layers of the full-tuning model by each post-hoc score, as explicit index specs (``'1,3'``)."""
    from .score import score_layers

    specs = {}
    for metric in POSTHOC_METRICS:
        if metric == "weight_change":
            reference = _reference_model(ctx)
            scores = score_layers(full_model, metric=metric, reference=reference, progress=False)
        else:
            scores = score_layers(full_model, ctx.calibration, metric, progress=False)
        top = sorted(scores, key=lambda i: (-scores[i], i))[:k]  # higher = more important; ties: lower index
        specs[f"posthoc_{metric}"] = (",".join(str(i) for i in sorted(top)), {int(i): s for i, s in scores.items()})
    return specs


def _reference_model(ctx: SeedContext) -> Any:
    import torch

    from .model_io import load_plain

    return load_plain(ctx.base_dir, torch.float32).eval()


def run_seed(config: Any, seed: int, out: str, data: dict) -> dict:
    """Build the base of ``seed`` and run every strategy from it; write ``runs/seed<seed>.json``; return it."""
    import torch

    config = config if isinstance(config, StudyConfig) else StudyConfig(**config)
    threads = torch.get_num_threads()  # put back afterwards: a caller in the same process keeps its own setting
    torch.set_num_threads(config.threads)
    try:
        return _run_seed(config, seed, out, data)
    finally:
        torch.set_num_threads(threads)


def _run_seed(config: StudyConfig, seed: int, out: str, data: dict) -> dict:
    from .spec import region_size

    with quiet_library(keep=logger.name):
        models = os.path.join(out, "models", f"seed{seed}")
        start = time.perf_counter()
        base = build_base(config, seed, data, models)
        ctx = _context(config, seed, data, base["dir"], os.path.join(models, "runs"))
        base.update(visual_accuracy=ctx.base_visual, text_accuracy=ctx.base_text)
        logger.info("[seed %d] base: visual %.1f%%, text %.1f%%", seed, 100 * ctx.base_visual, 100 * ctx.base_text)
        k = region_size(_ratio(config.region), config.num_layers)
        runs, posthoc = [], {}
        for strategy in plan_strategies(config):
            spec = strategy.spec or posthoc[strategy.name][0]
            record, model = run_strategy(ctx, strategy.name, spec)
            if strategy.name == FULL:
                posthoc = posthoc_specs(ctx, model, k)
                record["posthoc_scores"] = {name: scores for name, (_, scores) in posthoc.items()}
            record["pruned"] = prune_and_measure(ctx, model, spec)
            runs.append(record)
            logger.info("[seed %d] %-20s layers %-15s visual %5.1f%%  text %5.1f%%  pruned %5.1f%%", seed,
                        strategy.name, ",".join(map(str, record["layers"])) or "-", 100 * record["visual_accuracy"],
                        100 * record["text_accuracy"], 100 * record["pruned"]["visual_accuracy"])  # fmt: skip
        base["dir"] = os.path.relpath(base["dir"], out)  # results.json names no absolute path
        result = {"seed": seed, "base": base, "runs": runs, "seconds": time.perf_counter() - start}
    write_json(os.path.join(out, "runs", f"seed{seed}.json"), result, indent=1)
    return result


# ------------------------------------------------------------------------------------------------ statistics

_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a table to 30, then Cornish-Fisher)."""
    if df < 1:
        raise ValueError(f"t_quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: list) -> dict:
    """``{"mean", "ci", "sd", "n"}``: the mean and the half-width of its 95% t-interval (``None`` below 2 values)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci": None, "sd": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci": None, "sd": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci": t_quantile(n - 1) * sd / math.sqrt(n), "sd": sd, "n": n}


def _paired(values: dict, reference: dict) -> dict:
    """Mean and 95% interval of the per-seed differences ``values[s] - reference[s]``; ``separated``: it excludes 0."""
    seeds = sorted(s for s in values if s in reference and values[s] is not None and reference[s] is not None)
    stats = mean_ci([values[s] - reference[s] for s in seeds])
    stats["separated"] = stats["ci"] is not None and abs(stats["mean"]) > stats["ci"]
    return stats


def _by_seed(runs: list, name: str, key: str, pruned: bool = False) -> dict:
    """``{seed: value}`` of one strategy's runs (values that could not be measured, ``None``, left out)."""
    out = {}
    for run in runs:
        if run["strategy"] == name:
            value = (run["pruned"] if pruned else run)[key]
            if value is not None:
                out[run["seed"]] = value
    return out


def _mean(values: list) -> Optional[float]:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def _pooled_random(runs: list, names: list) -> list:
    """One extra run per seed for the random draws together: each number the mean over the draws."""
    pooled = []
    keys = ("visual_accuracy", "text_accuracy", "retention", "trainable_share", "train_seconds", "train_cpu_seconds")
    for seed in sorted({r["seed"] for r in runs}):
        draws = [r for r in runs if r["seed"] == seed and r["strategy"] in names]
        record = {key: _mean([d[key] for d in draws]) for key in keys}
        record["pruned"] = {key: _mean([d["pruned"][key] for d in draws]) for key in keys[:3]}
        pooled.append(dict(seed=seed, strategy="random (pooled)", **record))
    return pooled


def aggregate(strategies: list, runs: list) -> list:
    """One summary row per strategy (plus the random draws pooled): means with 95% intervals, paired differences
    to full tuning (visual accuracy, retention; pruned: to the pruned full model), and the rank by visual accuracy."""
    randoms = [s.name for s in strategies if s.group == "random"]
    runs = runs + _pooled_random(runs, randoms)
    names = [s.name for s in strategies] + ["random (pooled)"]
    groups = {s.name: s.group for s in strategies} | {"random (pooled)": "random"}
    rows = []
    for name in names:
        row: dict = {"strategy": name, "group": groups[name]}
        for key in ("visual_accuracy", "text_accuracy", "retention", "trainable_share", "train_seconds",
                    "train_cpu_seconds"):  # fmt: skip
            row[key] = mean_ci(list(_by_seed(runs, name, key).values()))
        for key in ("visual_accuracy", "retention"):
            row[f"{key}_vs_full"] = _paired(_by_seed(runs, name, key), _by_seed(runs, FULL, key))
            row[f"pruned_{key}"] = mean_ci(list(_by_seed(runs, name, key, pruned=True).values()))
            row[f"pruned_{key}_vs_full"] = _paired(
                _by_seed(runs, name, key, pruned=True), _by_seed(runs, FULL, key, pruned=True)
            )
        uniform = next(s.name for s in strategies if s.group == "paper")
        row["visual_accuracy_vs_uniform"] = _paired(
            _by_seed(runs, name, "visual_accuracy"), _by_seed(runs, uniform, "visual_accuracy")
        )
        full = mean_ci(list(_by_seed(runs, FULL, "visual_accuracy").values()))["mean"]
        row["visual_relative_to_full"] = _ratio_of(row["visual_accuracy"]["mean"], full)
        rows.append(row)
    order = sorted(rows, key=lambda r: -r["visual_accuracy"]["mean"])
    for rank, row in enumerate(order, 1):
        row["rank"] = rank
    return rows


# ------------------------------------------------------------------------------------------------ the study


def _run_seeds(config: StudyConfig, out: str, data: dict) -> list:
    """Every seed's runs: in this process (``jobs=1``) or in ``jobs`` spawned processes, one seed at a time each."""
    seeds = [config.seed + i for i in range(config.seeds)]
    jobs = min(config.jobs, len(seeds))
    if jobs == 1:
        return [run_seed(config, seed, out, data) for seed in seeds]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        results = pool.starmap(run_seed, [(asdict(config), seed, out, data) for seed in seeds], chunksize=1)
    return sorted(results, key=lambda r: r["seed"])


def _machine() -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    system = f"{platform.system()} {platform.machine()}"
    return dict(system=system, cpus=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                device="cpu", load_average=list(load) if load else None)  # fmt: skip


def run_study(out_dir: str = "study", config: Optional[StudyConfig] = None, *, overwrite: bool = False) -> dict:
    """Run the whole study into ``out_dir`` (refused if it is not empty, unless ``overwrite``); return the results."""
    from .outputs import check_output, writing

    config = config or StudyConfig()
    config.validate()
    strategies = plan_strategies(config)
    out = os.path.abspath(out_dir)
    check_output(out, overwrite=overwrite)
    start = time.perf_counter()
    machine = _machine()
    with writing(out, "vr-plugin study", replace=overwrite) as target:
        with quiet_library(keep=logger.name):
            logger.info("study: %d strategies x %d seeds into %s", len(strategies), config.seeds, out)
            data = make_data(os.path.join(target, "data"), config)
            seeds = _run_seeds(config, target, data)
        runs = [run for result in seeds for run in result["runs"]]
        machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        results = dict(command=" ".join(["vr-plugin", *sys.argv[1:]]) if sys.argv else "vr-plugin study",
                       date=datetime.date.today().isoformat(), machine=machine, config=asdict(config),
                       strategies=[asdict(s) for s in strategies], bases=[r["base"] for r in seeds], runs=runs,
                       summary=aggregate(strategies, runs), seconds=time.perf_counter() - start)  # fmt: skip
        write_json(os.path.join(target, "results.json"), results, indent=1)
        write_report(target, results)
    return results


# ------------------------------------------------------------------------------------------------ the report

# The paper's figures for the same comparisons, as /work/shared/reference/paper.md gives them: Bunny-Llama-3-8B-V,
# LoRA, 8 of 32 layers, average over 10 visual tasks. Every number there comes from a secondary summary that was not
# checked against the paper's PDF ([NOTE]); the abstract's claims ([ABS]) are primary.
PAPER_VISUAL = {
    FULL: "62.18 (the reference)",
    "uniform": "61.82 (99.42% of all) in the strategy table; 61.78 (99.36%) in the ratio table",
    "first_0.25": "60.24",
    "mid-bottom": "in the paper, number not in the source checked",
    "mid-top": "in the paper, number not in the source checked",
    "last_0.25": "57.26 (the worst)",
    "hybrid": "in the paper, number not in the source checked",
    "random": "not mentioned in the sources checked",
    "posthoc_weight_change": "61.45 (parameter change ratio)",
    "posthoc_bi": "in the paper, number not in the source checked",
    "posthoc_angular": "60.77",
    "none": "not in the sources checked",
}
PAPER_RATIO = {0.125: "60.94 (98.01%)", 0.25: "61.78 (99.36%)", 0.5: "61.82 (99.42%)", 0.75: "not in the sources"}
UNVERIFIED = "¹"


def _paper_key(strategy: dict, depth: int) -> str:
    name, group = strategy["name"], strategy["group"]
    q = depth // 4
    if group == "paper":
        return "uniform"
    if name == f"{q}:{2 * q}":
        return "mid-bottom"
    if name == f"{2 * q}:{3 * q}":
        return "mid-top"
    return group if group in ("hybrid", "random") else name


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _pm(stat: dict, scale: float = 100, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "—"
    text = f"{scale * stat['mean']:.{digits}f}"
    return text if stat["ci"] is None else f"{text} ± {scale * stat['ci']:.{digits}f}"


def _delta(stat: dict, scale: float = 100) -> str:
    """A paired difference as ``-1.2 [-3.0, +0.6]``, bold when its interval excludes 0."""
    if stat["mean"] is None or stat["ci"] is None:
        return "—"
    mean, ci = scale * stat["mean"], scale * stat["ci"]
    text = f"{mean:+.1f} [{mean - ci:+.1f}, {mean + ci:+.1f}]"
    return f"**{text}**" if stat["separated"] else text


def _vs_full(row: dict, key: str) -> str:
    return "(the reference)" if row["strategy"] == FULL else _delta(row[key])


def _layer_sets(runs: list, name: str) -> str:
    """The layers a strategy trained, per seed when they differ (post-hoc)."""
    sets: dict = {}
    for run in runs:
        if run["strategy"] == name:
            sets.setdefault(",".join(map(str, run["layers"])) or "—", []).append(run["seed"])
    if len(sets) == 1:
        return next(iter(sets))
    return "; ".join(f"{layers} (seed {', '.join(map(str, seeds))})" for layers, seeds in sets.items())


def _rows_by_name(results: dict) -> dict:
    return {row["strategy"]: row for row in results["summary"]}


def _strategy_table(results: dict) -> list:
    rows, full = _rows_by_name(results), _rows_by_name(results)[FULL]
    full_cpu = full["train_cpu_seconds"]["mean"]
    lines = [
        "| rank | strategy | spec → layers | trainable | visual acc. % | Δ vs full (paired 95% CI) | of full "
        "| text retention % | Δ retention vs full | train CPU s (vs full) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy in results["strategies"] + [{"name": "random (pooled)", "label": "random draws pooled"}]:
        row = rows[strategy["name"]]
        cpu = row["train_cpu_seconds"]["mean"]
        spec = strategy.get("spec") or ("(top-k)" if strategy.get("metric") else "(mean of the draws)")
        layers = (
            _layer_sets(results["runs"], strategy["name"]) if strategy.get("metric") or strategy.get("spec") else ""
        )
        relative = _pct(row["visual_relative_to_full"])
        share = f"{100 * row['trainable_share']['mean']:.1f}%"
        lines.append(
            f"| {row['rank']} | {strategy['label']} | `{spec}` → {layers or '—'} | {share} | "
            f"{_pm(row['visual_accuracy'])} | {_vs_full(row, 'visual_accuracy_vs_full')} | {relative} | "
            f"{_pm(row['retention'])} | {_vs_full(row, 'retention_vs_full')} | {cpu:.1f} ({_pct(cpu / full_cpu - 1)}) |"
        )
    return lines


def _ratio_table(results: dict) -> list:
    rows = _rows_by_name(results)
    lines = ["| layers tuned | share of layers | visual acc. % | of full | text retention % | paper (avg, of all)"
             f"{UNVERIFIED} |", "|---|---|---|---|---|---|"]  # fmt: skip
    depth = results["config"]["num_layers"]
    points = [("none", 0.0)] + [(f"uniform_{_ratio(r)}", r) for r in results["config"]["ratios"]] + [(FULL, 1.0)]
    for name, ratio in points:
        row = rows[name]
        count = len(next(r["layers"] for r in results["runs"] if r["strategy"] == name))
        paper = "62.18 (100%)" if name == FULL else PAPER_RATIO.get(ratio, "—")
        relative = _pct(row["visual_relative_to_full"])
        lines.append(f"| `{name}` ({count}/{depth}) | {100 * ratio:g}% | {_pm(row['visual_accuracy'])} | {relative} | "
                     f"{_pm(row['retention'])} | {paper} |")  # fmt: skip
    return lines


def _prune_table(results: dict) -> list:
    rows = _rows_by_name(results)
    remove = results["config"]["remove"]
    lines = [f"| strategy | visual acc. % before → after removing {remove} layers | Δ after vs pruned full "
             "(paired 95% CI) | text retention % after |", "|---|---|---|---|"]  # fmt: skip
    for strategy in results["strategies"]:
        row = rows[strategy["name"]]
        before, after = _pm(row["visual_accuracy"]), _pm(row["pruned_visual_accuracy"])
        delta = _vs_full(row, "pruned_visual_accuracy_vs_full")
        lines.append(f"| {strategy['label']} | {before} → {after} | {delta} | {_pm(row['pruned_retention'])} |")
    return lines


def _paper_table(results: dict) -> list:
    rows, depth = _rows_by_name(results), results["config"]["num_layers"]
    lines = [
        f"| strategy | here: visual acc. % (of full) | paper: avg of 10 visual tasks{UNVERIFIED} |",
        "|---|---|---|",
    ]
    for strategy in results["strategies"]:
        key = _paper_key(strategy, depth)
        if key not in PAPER_VISUAL or (strategy["group"] == "random" and strategy["name"] != _first_random(results)):
            continue
        row = rows["random (pooled)" if key == "random" else strategy["name"]]
        label = "random draws, pooled" if key == "random" else strategy["label"]
        lines.append(f"| {label} | {_pm(row['visual_accuracy'])} ({_pct(row['visual_relative_to_full'])}) | "
                     f"{PAPER_VISUAL[key]} |")  # fmt: skip
    return lines


def _first_random(results: dict) -> Optional[str]:
    return next((s["name"] for s in results["strategies"] if s["group"] == "random"), None)


def _names(rows: list) -> str:
    return ", ".join(f"`{r['strategy']}`" for r in rows) or "none"


def _seeds_needed(sd: Optional[float], delta: float) -> str:
    if not sd:
        return "—"
    return str(max(2, math.ceil((1.959964 * sd / delta) ** 2)))


def _separated(rows: list, key: str, sign: int) -> str:
    """The strategies whose paired interval ``key`` excludes 0 on the side ``sign``."""
    return _names([r for r in rows if r[key]["separated"] and sign * r[key]["mean"] > 0])


def _verdict(results: dict) -> list:
    rows = results["summary"]
    by_name = _rows_by_name(results)
    uniform = next(r for r in rows if r["group"] == "paper")
    others = [r for r in rows if r["strategy"] not in (FULL, uniform["strategy"])]
    diff = uniform["visual_accuracy_vs_full"]
    verdict = "the interval excludes 0." if diff["separated"] else "the interval includes 0: not separated here."
    lines = [
        f"- **Sparse & uniform vs full tuning** (`{uniform['strategy']}`): Δ visual accuracy {_delta(diff)} points "
        f"over {diff['n']} paired seeds — {verdict}",
        f"- Below full tuning (interval excludes 0): {_separated(others, 'visual_accuracy_vs_full', -1)}; above: "
        f"{_separated(others, 'visual_accuracy_vs_full', 1)}.",
        f"- Sparse & uniform vs every other strategy (paired): better than "
        f"{_separated(others, 'visual_accuracy_vs_uniform', -1)}; worse than "
        f"{_separated(others, 'visual_accuracy_vs_uniform', 1)}; not separated from the rest.",
        f"- **Text retention** (text accuracy after visual tuning / the base's): full tuning "
        f"{_pm(by_name[FULL]['retention'])}%, sparse & uniform {_pm(uniform['retention'])}%, projector only "
        f"{_pm(by_name['none']['retention'])}% (its LLM is the base's); Δ uniform − full "
        f"{_delta(uniform['retention_vs_full'])} points.",
    ]
    sd = diff["sd"]
    n_test = results["config"]["n_test"]
    p = uniform["visual_accuracy"]["mean"] or 0.0
    lines.append(
        f"- **Resolution.** The per-seed spread (sd) of the uniform − full difference is "
        f"{'—' if sd is None else f'{100 * sd:.1f}'} points; one accuracy on {n_test} questions has a sampling error "
        f"of about {100 * math.sqrt(p * (1 - p) / n_test):.1f} points. At this spread, resolving a 2-point gap takes "
        f"about {_seeds_needed(sd, 0.02)} seeds, a 1-point gap {_seeds_needed(sd, 0.01)}, and the paper's "
        f"0.36-point uniform-vs-all gap{UNVERIFIED} {_seeds_needed(sd, 0.0036)}."
    )
    if not any(r["visual_accuracy_vs_full"]["separated"] for r in others + [uniform]):
        lines.append(
            "- **This setting does not separate the strategies**: no strategy's interval to full tuning excludes 0. "
            "A setting that would: more seeds (above), a larger test set, and a deeper model, where a quarter is "
            "more than a couple of layers and 'uniform' and the blocks differ in more than one or two layers."
        )
    return lines


def _header(results: dict) -> list:
    config, machine = results["config"], results["machine"]
    load = machine.get("load_average") or []
    end = machine.get("load_average_end") or []
    loads = f"load average {load[0]:.1f} at the start, {end[0]:.1f} at the end" if load and end else "load unknown"
    k = len(next(r["layers"] for r in results["runs"] if r["strategy"] == f"uniform_{_ratio(config['region'])}"))
    return [
        "# vr-plugin study: which layers to tune during visual instruction tuning",
        "",
        f"Measured by `{results['command']}` on {results['date']} ({machine['system']}, {machine['cpus']} CPU cores, "
        f"{config['jobs']} process{'es' if config['jobs'] > 1 else ''} of {config['threads']} torch thread"
        f"{'s' if config['threads'] > 1 else ''}, torch {machine['torch']}, {machine['device']}; {loads}); the whole "
        f"run took **{results['seconds'] / 60:.1f} min**. The numbers depend only on the seeds (the same seeds give "
        "the same numbers); the times depend on the machine's load.",
        "",
        f"**Setting.** Per seed, a small Llava ({config['num_layers']} LLM decoder layers of width {config['hidden']}, "
        f"a frozen CLIP tower, an MLP projector) is pre-trained for {config['pretrain_steps']} steps on "
        f"{config['n_train']} image captions and a text-only task (every sum a + b with a, b < "
        f"{config['max_operand']}, exact answers), every LLM and projector weight learning; then aligned for "
        f"{config['align_steps']} steps "
        "(projector only, LLM frozen), as LLaVA does. From that base, each strategy is visual-instruction-tuned for "
        f"{config['steps']} steps (batch {config['batch_size']}, learning rate {config['learning_rate']:g}, the same "
        f"data order) on {config['n_train']} synthetic questions (colour, shape, count, position). Measured: accuracy "
        f"on {config['n_test']} held-out questions (exact match), text-task accuracy relative to the base's "
        f"(**retention**), trainable share of all parameters, train CPU time; then again after removing "
        f"{config['remove']} layers outside the region by angular distance. {config['seeds']} seeds "
        f"({', '.join(str(b['seed']) for b in results['bases'])}), paired: every strategy of a seed starts from the "
        f"same base. Post-hoc strategies take the top {k} layers of that seed's full-tuning run.",
        "",
        "Mean ± half-width of the 95% t-interval over seeds; Δ: the mean per-seed difference with its paired 95% "
        "interval, **bold** where it excludes 0; rank by mean visual accuracy.",
    ]


def _bases_table(results: dict) -> list:
    lines = ["| seed | base visual acc. % | base text acc. % |", "|---|---|---|"]
    for base in results["bases"]:
        lines.append(f"| {base['seed']} | {100 * base['visual_accuracy']:.1f} | {100 * base['text_accuracy']:.1f} |")
    return lines


def _plot(out: str, results: dict) -> list:
    """``strategies.png`` and ``ratio.png``; the names written (none without matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'vr-plugin[plot]'): the study's plots are skipped")
        return []
    rows = results["summary"]
    colours = {"reference": "grey", "paper": "tab:blue", "consecutive": "tab:orange", "hybrid": "tab:purple",
               "random": "tab:olive", "post-hoc": "tab:green", "ratio": "tab:cyan"}  # fmt: skip
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    for axes, key, title in zip(figure.subplots(1, 2, sharey=True), ("visual_accuracy", "retention"),
                                ("held-out visual accuracy %", "text retention % (of the base)")):  # fmt: skip
        y = list(range(len(rows)))[::-1]
        axes.barh(y, [100 * (r[key]["mean"] or 0) for r in rows], xerr=[100 * (r[key]["ci"] or 0) for r in rows],
                  color=[colours.get(r["group"], "grey") for r in rows], capsize=2)  # fmt: skip
        axes.set_yticks(y, [r["strategy"] for r in rows], fontsize=8)
        axes.set_xlabel(title)
        axes.grid(axis="x", alpha=0.3)
    figure.suptitle(f"Strategies, mean and 95% interval over {results['config']['seeds']} seeds")
    figure.savefig(os.path.join(out, "strategies.png"), dpi=72)
    by_name = _rows_by_name(results)
    points = [("none", 0.0)] + [(f"uniform_{_ratio(r)}", r) for r in results["config"]["ratios"]] + [(FULL, 1.0)]
    figure = Figure(figsize=(6, 3.6), layout="constrained")
    axes = figure.subplots()
    for key, label in (("visual_accuracy", "visual accuracy"), ("retention", "text retention")):
        axes.errorbar([100 * r for _, r in points], [100 * (by_name[n][key]["mean"] or 0) for n, _ in points],
                      yerr=[100 * (by_name[n][key]["ci"] or 0) for n, _ in points], marker="o", capsize=3,
                      label=label)  # fmt: skip
    axes.set_xlabel("share of LLM layers tuned (uniform; 0 = projector only, 100 = all)")
    axes.set_ylabel("%")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(os.path.join(out, "ratio.png"), dpi=72)
    return ["strategies.png", "ratio.png"]


def write_report(out: str, results: dict) -> str:
    """``report.md`` (and the plots) from ``results``; every number in it comes from ``results``."""
    plots = _plot(out, results)
    lines = [*_header(results), "", "## Strategies", "", *_strategy_table(results), "", "## What it shows", "",
             *_verdict(results), "", "## Region ratio (sparse & uniform)", "", *_ratio_table(results), "",
             "## After pruning outside the region", "", *_prune_table(results), "",
             "## Beside the paper's figures", "", *_paper_table(results), "",
             f"{UNVERIFIED} From `/work/shared/reference/paper.md` §4.5–4.6: Bunny-Llama-3-8B-V, LoRA, 8 of 32 layers, "
             "average over 10 visual tasks. Those numbers come from a secondary summary of the paper that was **not "
             "checked against the paper's PDF**; rows marked 'not in the source checked' exist in the paper but their "
             "numbers could not be checked. The abstract (primary) states that tuning 25% of the layers, sparsely and "
             "uniformly, keeps about 99% of visual performance and maintains or improves text-task performance, and "
             "that visual-region-based pruning removes layers outside the region with minimal loss. The same summary "
             f"gives the training-time saving at 25% as 13% (Bunny-8B) and 23% (LLaVA-1.5-7B/13B){UNVERIFIED}, text "
             f"benchmarks for Bunny-8B all-layer vs region (MMLU 60.27 vs 63.36){UNVERIFIED}, and pruning of 3–4 of 32 "
             f"non-region layers with minimal loss{UNVERIFIED} (no numbers).",
             "", "## Bases", "", *_bases_table(results), ""]  # fmt: skip
    lines += [f"![{name[:-4]}]({name})" for name in plots] or ["(matplotlib is not installed: no plots)"]
    lines += ["", "## Rerun", "", "```bash", results["command"], "```", "",
              "Every run (per seed and strategy: layers, trainable and changed layers, accuracies, times, pruned "
              "layers) is in `results.json`; the bases are in `models/seed*/base`, each run's `region_plan.json` in "
              "`models/seed*/runs/`.", ""]  # fmt: skip
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    return path
