"""The ``vr-plugin`` command: each subcommand is a few lines over the public API.

Errors a shell user can fix (a bad path, spec, record, flag, or a missing optional dependency) print one line,
``vr-plugin <command>: error: ...``, and exit with status 2; ``VR_PLUGIN_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
from typing import Any, Callable, Iterator, Optional

from .options import DTYPE_NAMES
from .spec import ACCEPTED_FORMS, describe_indices, select_layers

logger = logging.getLogger("vr_plugin.cli")

# pip extra that provides each optional module
OPTIONAL = {"bitsandbytes": "qlora", "matplotlib": "plot", "flash_attn": "flash", "deepspeed": "dev"}

EPILOG_SELECT = """examples:
  vr-plugin select uniform_0.25 --num-layers 32     # 1,5,9,13,19,23,27,31
  vr-plugin select 1::4 --num-layers 40
"""
EPILOG_INSPECT = """examples:
  vr-plugin inspect ./llava-1.5-7b-hf                          # the recorded region, else uniform_0.25
  vr-plugin inspect ./llava-1.5-13b-hf --visual_region first_0.25
  vr-plugin inspect ./run/checkpoint-500                       # which layers a checkpoint trained
"""
EPILOG_TRAIN = """Every transformers.TrainingArguments flag is accepted as well (--num_train_epochs, --learning_rate,
--per_device_train_batch_size, --gradient_accumulation_steps, --bf16, --gradient_checkpointing, --save_steps,
--deepspeed ds.json, --report_to, ...); `vr-plugin train --hf_help` lists them all. Defaults that differ from
the Trainer's: --logging_steps 10. The vision tower stays frozen unless --tune_vision_tower.

examples:
  vr-plugin train --model ./llava-1.5-7b-hf --data llava_v1_5_mix665k.json --images ./data \\
      --visual_region uniform_0.25 --output ./runs/vr --num_train_epochs 1 --learning_rate 2e-5 --bf16
  vr-plugin train --model ./Qwen2-VL-2B-Instruct --data conv.json --images ./imgs --lora --bits 4 \\
      --output ./runs/qlora --per_device_train_batch_size 4 --learning_rate 2e-4
  torchrun --nproc_per_node 8 -m vr_plugin train --model ... --output ./runs/vr --deepspeed zero2.json
  accelerate launch -m vr_plugin train --model ... --output ./runs/vr
  (several processes on a machine without GPUs: add --use_cpu true, or the Trainer sees one process per rank)
"""
EPILOG_EVAL = """Records are LLaVA conversations whose last turn is the reference answer. Multiple-choice questions
(options "A. ..." in the question, answer a letter or an option) are scored by option; others by normalized
exact match.

examples:
  vr-plugin eval --model ./runs/vr --data test.json --images ./imgs
  vr-plugin eval --model ./runs/vr-pruned --data mmbench.json --images ./imgs --out pruned.json --limit 500
"""
EPILOG_SCORE = """examples:
  vr-plugin score --model ./runs/vr --data calibration.json --images ./imgs --out scores.json
  vr-plugin score --model ./runs/vr --data calibration.json --images ./imgs --metric bi_multimodal
  vr-plugin score --model ./runs/vr --metric weight_change --reference ./llava-1.5-7b-hf --out wc.json
"""
EPILOG_PRUNE = """examples:
  vr-plugin prune --model ./runs/vr --scores scores.json --remove 4 --output ./runs/vr-pruned
  vr-plugin prune --model ./runs/vr --scores scores.json --remove 0.125 --output ./runs/vr-pruned
  vr-plugin prune --model ./runs/vr --layers 2,3 --output ./runs/vr-pruned
"""
EPILOG_DEMO = """Builds a small Llava-style model from configs and a synthetic VQA set (PIL shapes, colours, counts,
positions), trains it with the visual region and with all layers, evaluates both, scores and prunes layers
outside the region, evaluates again, and writes report.md and layers.png.

examples:
  vr-plugin demo                   # everything under ./vr_demo, a few minutes on 2 CPU cores
  vr-plugin demo --out /tmp/demo --quick
"""


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _flag(name: str) -> list:
    """``--name_with_underscores`` and its dashed spelling."""
    dashed = name.replace("_", "-")
    return [f"--{name}"] if dashed == name else [f"--{name}", f"--{dashed}"]


def _existing_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise CliError(f"{what} {path!r} does not exist" if not os.path.exists(path) else f"{what} {path!r} is no file")
    return path


def _existing_dir(path: Optional[str], what: str) -> Optional[str]:
    if path is not None and not os.path.isdir(path):
        raise CliError(
            f"{what} {path!r} does not exist" if not os.path.exists(path) else f"{what} {path!r} is no folder"
        )
    return path


def _dtype(name: Optional[str]):
    if name is None:
        return None
    from .training import DTYPES

    return DTYPES[name]


def _validated(args: argparse.Namespace) -> list:
    """The records of ``args.data``, every image opened, before any weights load (``--skip_bad_images`` drops)."""
    from .data import validate_conversations

    records, skipped = validate_conversations(args.data, args.images, args.skip_bad_images)
    if skipped:
        logger.warning("skipped %d records of %s with unreadable images", skipped, args.data)
    return records


def _skip_flag(parser: argparse.ArgumentParser) -> None:
    from .options import DataOptions, add_option_flags

    add_option_flags(parser, DataOptions, only=("skip_bad_images",))


def _writable_file(path: str, flag: str) -> None:
    """Raise ``CliError`` unless a file can be written at ``path`` (its folder exists, it is no directory)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CliError(f"{flag} {path!r} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise CliError(f"{flag} {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise CliError(f"{flag} {path!r}: the folder {folder!r} is not writable")


def _load(args: argparse.Namespace) -> tuple:
    from .outputs import check_complete, check_weight_files
    from .training import check_model_dir, load_model

    check_model_dir(args.model)
    check_complete(args.model)
    check_weight_files(args.model)
    return load_model(args.model, dtype=_dtype(args.dtype), device=args.device)


# ------------------------------------------------------------------------------------------------------ commands


def cmd_select(args: argparse.Namespace) -> int:
    """Print the indices a spec selects."""
    indices = select_layers(args.spec, args.num_layers)
    print(describe_indices(indices) if indices else "(none)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the layer map of a model directory, from its config on the meta device."""
    from .layer_map import layer_map
    from .training import check_model_dir

    check_model_dir(args.model_dir)
    print(layer_map(args.model_dir, args.visual_region, tune_vision_tower=args.tune_vision_tower).render())
    return 0


def _hf_parser(command: str = "train"):
    from transformers import HfArgumentParser, TrainingArguments

    class Parser(HfArgumentParser):
        def error(self, message: str):  # one line instead of the Trainer's whole usage
            raise CliError(f"training argument: {message}")

    return Parser(TrainingArguments, prog=f"vr-plugin {command}")


def training_config_from(args: argparse.Namespace, **overrides: Any) -> Any:
    """The validated :class:`~vr_plugin.training.RegionTrainingConfig` of flags added by :func:`add_train_options`."""
    from dataclasses import fields

    from .training import RegionTrainingConfig

    values = {f.name: getattr(args, f.name, f.default) for f in fields(RegionTrainingConfig)}
    config = RegionTrainingConfig(**{**values, **overrides})
    config.validate()
    return config


def training_arguments_from(hf_args: list, output_dir: str) -> Any:
    """``transformers.TrainingArguments`` from the remaining flags; an unknown flag is a one-line error."""
    training_args, unused = _hf_parser().parse_args_into_dataclasses(
        args=["--logging_steps", "10", *hf_args, "--output_dir", output_dir], return_remaining_strings=True
    )
    if unused:
        raise CliError(
            f"unrecognized arguments: {' '.join(unused)} (neither a vr-plugin flag, see --help, nor a "
            "transformers.TrainingArguments one, see --hf_help)"
        )
    return training_args


def cmd_train(args: argparse.Namespace, hf_args: list) -> int:
    """Visual instruction tuning with the region; HF TrainingArguments from the remaining flags."""
    from .training import train

    if args.output is None:
        raise CliError("the following arguments are required: --output")
    config = training_config_from(args)
    training_args = training_arguments_from(hf_args, args.output)
    records = _validated(args)  # every image opened before the output is touched or weights load
    result = _train_into(args, config, training_args, functools.partial(train, records=records))
    if result.main_process:
        plan, metrics = result.plan, result.metrics
        print(
            f"trained layers [{describe_indices(plan.layers)}] of {plan.num_layers} ({plan.spec}), "
            f"{100 * plan.trainable_share:.2f}% of the parameters, in {metrics.get('train_runtime', 0.0):.1f}s "
            f"(final train loss {metrics.get('train_loss', float('nan')):.4f}); saved to {', '.join(result.saved)}"
        )
    return 0


def _train_into(args: argparse.Namespace, config: Any, training_args: Any, train: Any) -> Any:
    """Run ``train`` writing ``args.output`` safely (:mod:`vr_plugin.outputs`); resumed checkpoints checked first."""
    from .outputs import check_output, check_weight_files, writing

    resume = training_args.resume_from_checkpoint
    from .backends.processes import is_main_process

    main = is_main_process()
    if main:
        check_output(args.output, inputs=[args.model], overwrite=args.overwrite_output_dir, resume=resume)
    if resume:
        _existing_dir(resume, "checkpoint")
        check_weight_files(resume)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # every rank must write the same directory
    replace = args.overwrite_output_dir and not distributed and not resume
    with writing(args.output, "vr-plugin train", replace=replace, main_process=main) as target:
        training_args.output_dir = target
        result = train(config, training_args)
    result.output_dir = args.output
    result.saved = [args.output + path[len(target) :] if path.startswith(target) else path for path in result.saved]
    return result


def cmd_eval(args: argparse.Namespace) -> int:
    """Greedy answers on a question-answer file, scored; predictions JSON written."""
    from .evaluate import evaluate, qa_records

    _existing_file(args.data, "question-answer file")
    _existing_dir(args.images, "image folder")
    records = _validated(args)
    qa_records(records, source=args.data)  # bad records fail before the model loads
    for flag in ("limit", "batch_size", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise CliError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    model, processor = _load(args)
    out = args.out or f"{os.path.splitext(os.path.basename(args.data))[0]}_predictions.json"
    report = evaluate(
        model,
        processor,
        records,
        args.images,
        source=args.data,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        out=out,
        model_id=args.model,
    )
    print(f"{report.summary()}\npredictions: {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score every decoder layer on calibration data (or by weight change); write the scores JSON."""
    from .data import calibration_batches
    from .record import read_region
    from .score import load_scores, score_layers

    reference = None
    if args.metric == "weight_change":
        if args.reference is None:
            raise CliError("--metric weight_change needs --reference BASE_MODEL_DIR (the model before training)")
    elif args.data is None:
        raise CliError(f"--metric {args.metric} needs --data CALIBRATION.json (and --images)")
    else:
        _existing_file(args.data, "calibration file")
        _existing_dir(args.images, "image folder")
    for flag in ("batch_size", "limit", "n"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise CliError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    _writable_file(args.out, "--out")  # before scoring, not after
    records = _validated(args) if args.data is not None else None
    if args.reference is not None:
        from .outputs import check_complete, check_weight_files

        check_complete(args.reference)
        check_weight_files(args.reference)
    model, processor = _load(args)
    batches = None
    if args.metric == "weight_change":
        from .training import load_model

        reference, _ = load_model(args.reference, dtype=_dtype(args.dtype), device=args.device)
    else:
        batches = calibration_batches(
            processor, args.data, args.images, batch_size=args.batch_size, limit=args.limit, records=records
        )
    score_layers(
        model,
        batches,
        args.metric,
        n=args.n,
        last_token=args.last_token,
        reference=reference,
        out=args.out,
        model_id=args.model,
        data_description=args.data or args.reference,
    )
    report = load_scores(args.out)
    region = read_region(model)
    print(_score_table(report.scores, set(region.layers) if region else set()))
    print(f"{report.metric} scores of {report.num_layers} layers written to {args.out}")
    return 0


def _score_table(scores: dict, region: set) -> str:
    ranks = {layer: rank for rank, layer in enumerate(sorted(scores, key=lambda i: (scores[i], i)), 1)}
    rows = [f"{'layer':>5}  {'score':>10}  {'rank':>4}  region"]
    for layer in sorted(scores):
        rows.append(f"{layer:>5}  {scores[layer]:>10.6f}  {ranks[layer]:>4}  {'yes' if layer in region else ''}")
    return "\n".join(rows) + "\n(rank 1 = least important)"


def _remove_amount(text: str):
    """``--remove``: a layer count (``4``) or a ratio in (0, 1) (``0.125``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a layer count (4) nor a ratio (0.125)") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio {text} is not in (0, 1)")
    return value


def cmd_prune(args: argparse.Namespace) -> int:
    """Remove decoder layers outside the region and save the pruned model."""
    from .prune import prune_outside_region
    from .record import read_region
    from .training import save_model

    if (args.remove is None) == (args.layers is None):
        raise CliError("give either --remove COUNT|RATIO (with --scores) or --layers I,J,...")
    if args.remove is not None and args.scores is None:
        raise CliError("--remove chooses the lowest-scoring layers: it needs --scores SCORES.json (vr-plugin score)")
    if args.scores is not None:
        _existing_file(args.scores, "scores file")
    from .outputs import check_output, writing

    check_output(args.output, inputs=[args.model], overwrite=args.overwrite_output_dir)
    model, processor = _load(args)
    if args.visual_region is None and read_region(model) is None:
        logger.warning(
            "%s records no visual region: any layer may be removed (--visual_region protects one)", args.model
        )
    remove = args.remove
    if args.layers is not None:
        from .locate import find_decoder_layers

        remove = select_layers(args.layers, len(find_decoder_layers(model).layers))
    record = prune_outside_region(
        model,
        region=args.visual_region,
        remove=remove,
        scores=args.scores,
        allow_region=args.allow_region,
        allow_visual_entry=args.allow_visual_entry,
    )
    with writing(args.output, "vr-plugin prune", replace=True) as target:
        save_model(model, processor, target)
    print(
        f"removed layers [{describe_indices(record.removed)}] (original numbering), kept "
        f"{len(record.kept)}/{record.original_num_layers}; saved to {args.output}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: region vs full tuning, scoring, pruning, report."""
    from .demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    for name in ("steps", "pretrain_steps", "n_train", "n_test", "num_layers", "seed", "seeds", "threads"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    result = run_demo(args.out, config, progress=not args.no_progress)
    print(f"report: {result.report}")
    if result.plot:
        print(f"layers: {result.plot}")
    return 0


def cmd_sweep(args: argparse.Namespace, hf_args: list) -> int:
    """Train and evaluate every region strategy on the user's model and data; rank them; say which to train."""
    from .sweep import recommendation_line, run_sweep, table

    result = run_sweep(args, hf_args)
    if result.report:  # the main process
        print("\n".join([*table(result.ranked), "", f"results: {result.results}", f"report: {result.report}"]))
        print(recommendation_line(result.recommended))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """The paper's layer-selection comparison, seeded and paired: report.md, results.json, plots."""
    from .study import StudyConfig, run_study

    config = StudyConfig.quick() if args.quick else StudyConfig()
    for name in ("seeds", "seed", "steps", "jobs", "threads"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    run_study(args.out, config, overwrite=args.overwrite_output_dir)
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


# ------------------------------------------------------------------------------------------------------ parser


def _overwrite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        *_flag("overwrite_output_dir"),
        action="store_true",
        help="replace a non-empty output directory (written beside it, swapped in when complete)",
    )


def _model_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="model directory (or peft adapter directory, or hub id)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="load the weights in this dtype")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the first GPU if there is one)")


def _subparser(sub, name: str, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )


def _add_select_parser(sub: Any) -> None:
    """``vr-plugin select``."""
    p = _subparser(
        sub,
        "select",
        "show the layer indices a region spec selects",
        f"Resolve a region spec to 0-based decoder-layer indices. Accepted forms: {ACCEPTED_FORMS}.",
        EPILOG_SELECT,
    )
    p.add_argument("spec", help="region spec, e.g. uniform_0.25")
    p.add_argument("--num-layers", "--num_layers", type=int, required=True, help="decoder depth of the LLM")
    p.set_defaults(func=cmd_select)


def _add_inspect_parser(sub: Any) -> None:
    """``vr-plugin inspect``."""
    p = _subparser(
        sub,
        "inspect",
        "show a model's layer map and what the region would train",
        "Read MODEL_DIR's config, build the model on the meta device (no weights are loaded, so it is instant for "
        "any size) and show the LLM depth, the region's layers, parameters per group and the trainable share.",
        EPILOG_INSPECT,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory (config.json), adapter directory or hub id")
    p.add_argument(*_flag("visual_region"), help="region spec (default: the recorded region, else uniform_0.25)")
    p.add_argument(*_flag("tune_vision_tower"), action="store_true", help="count the vision tower as trainable")
    p.set_defaults(func=cmd_inspect)


class _Excluding:
    """An argument parser view that drops the arguments whose destination is excluded."""

    def __init__(self, parser: argparse.ArgumentParser, exclude: set) -> None:
        self.parser, self.exclude = parser, exclude

    def add_argument(self, *flags: str, **kwargs: Any) -> Any:
        dest = kwargs.get("dest") or next(f for f in flags if f.startswith("--"))[2:].replace("-", "_")
        return None if dest in self.exclude else self.parser.add_argument(*flags, **kwargs)


def add_train_options(parser: argparse.ArgumentParser, exclude: tuple = ()) -> None:
    """Every ``vr-plugin train`` flag (model, data, output, region, LoRA, quantization, ...) except ``exclude``.

    ``exclude`` holds destination names (``"visual_region"``); ``vr-plugin sweep`` uses it to take every train
    flag but the region. TrainingArguments flags are not added here: they are the remaining arguments.
    """
    from .options import DataOptions, LoraOptions, MemoryOptions, QuantOptions, RegionOptions, add_option_flags

    p = _Excluding(parser, set(exclude))
    add_option_flags(p, DataOptions, exclude, only=("model", "data", "images"))
    p.add_argument(*_flag("output"), "--output_dir", "--output-dir", dest="output", help="where to save (required)")
    _overwrite_flag(p)
    add_option_flags(p, RegionOptions, exclude, only=("visual_region",))
    add_option_flags(p, RegionOptions, exclude=("visual_region", *exclude))
    for options in (LoraOptions, QuantOptions, MemoryOptions):
        add_option_flags(p, options, exclude)
    add_option_flags(p, DataOptions, exclude=("model", "data", "images", *exclude))


def _add_train_parser(sub: Any) -> None:
    """``vr-plugin train``."""
    p = _subparser(
        sub,
        "train",
        "visual instruction tuning of an HF-native LVLM with the region",
        "Train an HF-native LVLM (Llava, LLaVA-NeXT, Qwen2-VL, ...) on LLaVA-format conversations with its own "
        "processor and chat template (labels on the assistant turns only); only the visual region and the projector "
        "learn. Saves the model (or LoRA adapter) with the region recorded in its config.",
        EPILOG_TRAIN,
    )
    add_train_options(p)
    p.add_argument(*_flag("hf_help"), action="store_true", help="list every transformers.TrainingArguments flag")
    p.set_defaults(func=cmd_train)


def _add_eval_parser(sub: Any) -> None:
    """``vr-plugin eval``."""
    p = _subparser(
        sub,
        "eval",
        "exact-match / option accuracy on LLaVA-format question-answer data",
        "Answer every record greedily with the model's own chat template and score it; print the accuracy and write "
        "every prediction to a JSON file.",
        EPILOG_EVAL,
    )
    _model_flags(p)
    p.add_argument("--data", required=True, help="LLaVA-format question-answer file")
    p.add_argument("--images", help="folder the records' image names are relative to")
    p.add_argument(*_flag("batch_size"), type=int, default=8, help="prompts per generate call (default: %(default)s)")
    p.add_argument(*_flag("max_new_tokens"), type=int, default=16, help="answer length cap (default: %(default)s)")
    p.add_argument("--limit", type=int, help="evaluate the first N records only")
    p.add_argument("--out", help="predictions JSON (default: DATA-NAME_predictions.json here)")
    _skip_flag(p)
    p.set_defaults(func=cmd_eval)


def _add_score_parser(sub: Any) -> None:
    """``vr-plugin score``."""
    from .score import METRICS

    p = _subparser(
        sub,
        "score",
        "score every decoder layer's importance on calibration data",
        "Score the decoder layers (higher = more important) from hidden states on image+text calibration prompts "
        "(the human turns of a LLaVA-format file), or by weight change against the base model.",
        EPILOG_SCORE,
    )
    _model_flags(p)
    p.add_argument("--data", help="LLaVA-format calibration file (its human turns are the prompts)")
    p.add_argument("--images", help="folder the records' image names are relative to")
    p.add_argument("--metric", choices=METRICS, default="angular", help="importance metric (default: %(default)s)")
    p.add_argument("--n", type=int, default=1, help="angular distance over n consecutive layers (default: 1)")
    p.add_argument(*_flag("last_token"), action="store_true", help="angular: each prompt's last token only")
    p.add_argument("--reference", help="base model directory (for --metric weight_change)")
    p.add_argument(*_flag("batch_size"), type=int, default=4, help="prompts per forward pass (default: %(default)s)")
    p.add_argument("--limit", type=int, help="use the first N records only")
    p.add_argument("--out", default="scores.json", help="scores JSON (default: %(default)s)")
    _skip_flag(p)
    p.set_defaults(func=cmd_score)


def _add_prune_parser(sub: Any) -> None:
    """``vr-plugin prune``."""
    p = _subparser(
        sub,
        "prune",
        "remove decoder layers outside the region and save the model",
        "Remove the lowest-scoring decoder layers outside the visual region (or the given layers), renumber the rest, "
        "fix the config, record what was removed, and save a model that loads with plain from_pretrained.",
        EPILOG_PRUNE,
    )
    _model_flags(p)
    p.add_argument("--scores", help="scores JSON from vr-plugin score")
    p.add_argument("--remove", type=_remove_amount, help="how many layers to remove: a count (4) or a ratio (0.125)")
    p.add_argument("--layers", help="remove exactly these layers instead (indices or slices, e.g. 2,3 or 10:14)")
    p.add_argument(*_flag("visual_region"), help="protect this region instead of the one recorded in the config")
    p.add_argument(*_flag("allow_region"), action="store_true", help="let region layers be removed too")
    p.add_argument(
        *_flag("allow_visual_entry"),
        action="store_true",
        help="let layers where image features enter the LLM (cross-attention, DeepStack targets) be removed too",
    )
    p.add_argument(*_flag("output"), "--output_dir", "--output-dir", dest="output", required=True, help="save here")
    _overwrite_flag(p)
    p.set_defaults(func=cmd_prune)


def _add_demo_parser(sub: Any) -> None:
    """``vr-plugin demo``."""
    p = _subparser(
        sub,
        "demo",
        "the main job: region vs full tuning, scoring, pruning, report.md + layers.png",
        "Run the whole method end to end on a small model built from configs and a synthetic VQA set, and report "
        "the measured numbers.",
        EPILOG_DEMO,
    )
    p.add_argument("--out", default="vr_demo", help="output folder (default: ./%(default)s)")
    p.add_argument("--quick", action="store_true", help="a reduced run (fewer samples and steps), for tests")
    p.add_argument("--steps", type=int, help="instruction-tuning steps of each run (default: 150)")
    p.add_argument(*_flag("pretrain_steps"), type=int, help="pre-training steps of the base model (default: 200)")
    p.add_argument(*_flag("n_train"), type=int, help="training questions (default: 1024)")
    p.add_argument(*_flag("n_test"), type=int, help="held-out questions (default: 200)")
    p.add_argument(*_flag("num_layers"), type=int, help="decoder layers of the demo LLM (default: 8)")
    p.add_argument("--seed", type=int, help="seed of the data, the model and the training")
    p.add_argument("--seeds", type=int, help="training seeds of the region-vs-full comparison (default: 3)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1, fastest for the demo's tiny matrices)")
    p.add_argument(*_flag("no_progress"), action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def _add_sweep_parser(sub: Any) -> None:
    """``vr-plugin sweep``."""
    epilog = """Every vr-plugin train flag (--model, --data, --images, --lora, --bits, --quantize_frozen,
--projector_lr, ...) and every transformers.TrainingArguments flag applies to each run alike (`vr-plugin sweep
--hf_help`). Each run trains --max_steps steps (100 unless --max_steps or --num_train_epochs is given). Rerun
the same command to continue a stopped sweep or add strategies; runs already in OUT/sweep.json are not trained
again.

examples:
  vr-plugin sweep --model ./llava-1.5-7b-hf --data train.json --images ./imgs --eval_data val.json \\
      --output ./sweeps/llava --max_steps 200 --learning_rate 2e-5 --bf16
  vr-plugin sweep --model ./Qwen2-VL-2B-Instruct --data conv.json --images ./imgs --eval_data qa.json \\
      --strategies uniform_0.25 uniform_0.5 first_0.25 all --lora --output ./sweeps/qwen --max_steps 100
  torchrun --nproc_per_node 8 -m vr_plugin sweep --model ... --eval_data val.json --output ./sweeps/vr
"""
    p = _subparser(
        sub,
        "sweep",
        "train and rank region strategies on your own model and data",
        "Train the same strategy grid (region specs) on your model and data for the same step budget, one run after "
        "another, evaluate each on --eval_data (answer-token loss; accuracy where records end with an answer), and "
        "write OUT/sweep.json (resumable), OUT/report.md and OUT/sweep.png ranking them, ending with the region to "
        "train.",
        epilog,
    )
    add_train_options(p, exclude=("visual_region", "output"))
    p.add_argument(*_flag("output"), "--output_dir", "--output-dir", dest="output", required=True, help="sweep folder")
    p.add_argument(
        "--strategies",
        nargs="+",
        metavar="SPEC",
        help="region specs to compare (default: uniform_0.25, the four quarters as slices, all, none)",
    )
    p.add_argument(*_flag("eval_data"), required=True, help="LLaVA-format evaluation file")
    p.add_argument(*_flag("eval_images"), help="image folder of --eval_data (default: --images)")
    p.add_argument(*_flag("eval_batch_size"), type=int, default=8, help="evaluation batch (default: %(default)s)")
    p.add_argument(*_flag("max_new_tokens"), type=int, default=16, help="answer length cap (default: %(default)s)")
    p.add_argument(*_flag("eval_limit"), type=int, help="evaluate on the first N records only")
    p.add_argument(*_flag("no_accuracy"), action="store_true", help="eval loss only (no generation)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="recommend the smallest region within this of the best eval loss (relative) and accuracy (default: "
        "%(default)s)",
    )
    p.add_argument(*_flag("no_progress"), action="store_true", help="no progress bar over the runs")
    p.add_argument(*_flag("hf_help"), action="store_true", help="list every transformers.TrainingArguments flag")
    p.set_defaults(func=cmd_sweep)


def _add_study_parser(sub: Any) -> None:
    """``vr-plugin study``."""
    p = _subparser(
        sub,
        "study",
        "the paper's comparison of layer-selection strategies, seeded and paired: report.md + results.json",
        "Pre-train a small Llava (captions and a text task), align it, then visual-instruction-tune it with every "
        "strategy (uniform, quarters, bottom+top, random, post-hoc top-k, all, none, a ratio sweep) over several "
        "seeds; report accuracy, text retention, trainable share and time, before and after pruning, with paired "
        "95% intervals to full tuning.",
        "examples:\n  vr-plugin study                    # ./study, about 20 minutes on 2 CPU cores\n"
        "  vr-plugin study --quick --out /tmp/study   # the whole pipeline in under a minute (numbers meaningless)\n",
    )
    p.add_argument("--out", default="study", help="output folder (default: ./%(default)s)")
    p.add_argument("--quick", action="store_true", help="a reduced run (tiny sizes, 2 seeds), for tests")
    p.add_argument("--seeds", type=int, help="how many seeds (default: 5)")
    p.add_argument("--seed", type=int, help="the first seed (default: 0)")
    p.add_argument("--steps", type=int, help="visual instruction-tuning steps of each run (default: 120)")
    p.add_argument("--jobs", type=int, help="processes running seeds in parallel (default: 2; numbers unchanged)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: 1)")
    _overwrite_flag(p)
    p.set_defaults(func=cmd_study)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vr-plugin`` with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="vr-plugin",
        description="Tune only the visual region of an LVLM's LLM, and prune around it (arXiv 2412.12785).",
        epilog="Start with `vr-plugin demo`. `vr-plugin COMMAND --help` shows each command's flags and examples.",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_select_parser(sub)
    _add_inspect_parser(sub)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_score_parser(sub)
    _add_prune_parser(sub)
    _add_demo_parser(sub)
    _add_study_parser(sub)
    _add_sweep_parser(sub)
    return parser


# subcommands whose remaining arguments are transformers.TrainingArguments flags (their func takes them second)
TRAINING_COMMANDS = ("train", "sweep")


def _one_line(error: BaseException) -> str:
    if isinstance(error, ImportError) and error.name:
        root = error.name.split(".")[0]
        extra = OPTIONAL.get(root)
        hint = f"pip install 'vr-plugin[{extra}]'" if extra else f"pip install {root}"
        return f"missing optional dependency {root!r} ({hint}): {error}"
    text = str(error) or type(error).__name__
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return " ".join(text.split())


@contextlib.contextmanager
def _verbosity(args: argparse.Namespace) -> Iterator[None]:
    """``-q`` / ``-v``: the vr_plugin and transformers log levels while the command runs."""
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else None
    if level is None:
        yield
        return
    from ._logging import log_levels

    with log_levels(level, transformers_level=level):
        yield


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``vr-plugin`` console script."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in TRAINING_COMMANDS and any(a in ("--hf_help", "--hf-help") for a in argv):
        _hf_parser(argv[0]).print_help()
        return 0
    args, rest = parser.parse_known_args(argv)
    takes_rest = args.command in TRAINING_COMMANDS
    if not takes_rest and rest:
        parser.parse_args(argv)  # argparse's own message and exit status 2
    func: Callable[..., int] = args.func
    try:
        with _verbosity(args):
            return func(args, rest) if takes_rest else func(args)
    except KeyboardInterrupt:
        print(f"vr-plugin {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which has closed it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, CliError, OSError, LookupError, ImportError) as error:
        if os.environ.get("VR_PLUGIN_TRACEBACK"):
            raise
        print(f"vr-plugin {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
