"""The region argument hook: HfArgumentParser dataclass, argparse flags, extending a host's dataclass."""

import argparse
import dataclasses
import pickle

import pytest
from transformers import HfArgumentParser, TrainingArguments

from vr_plugin.args import RegionArguments, add_region_args, extend_arguments, region_arguments_from


def test_hf_argument_parser_alone_and_extended():
    (region,) = HfArgumentParser(RegionArguments).parse_args_into_dataclasses(["--visual_region", "uniform_0.25"])
    assert region.region_spec == "uniform_0.25" and region.region_options()["tune_projector"] is True
    extended = extend_arguments(TrainingArguments)
    assert extend_arguments(TrainingArguments) is extended and extend_arguments(extended) is extended
    (args,) = HfArgumentParser(extended).parse_args_into_dataclasses(
        ["--output_dir", "out", "--tune_layers", "1,5,9", "--tune_projector", "False", "--learning_rate", "1e-3"]
    )
    assert isinstance(args, TrainingArguments) and args.learning_rate == 1e-3
    assert args.region_spec == "1,5,9" and args.region_options()["tune_projector"] is False
    assert pickle.loads(pickle.dumps(args)).tune_layers == "1,5,9"  # the Trainer saves its arguments


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--visual_region", "uniform_0.25", "--tune_layers", "1,2"], "both given; use one"),
        (["--tune_layers", "1;2"], "not a comma-separated list"),
        (["--visual_region", " "], "is empty"),
    ],
)
def test_conflicts_and_garbage(flags, message):
    with pytest.raises(ValueError, match=message):
        HfArgumentParser(RegionArguments).parse_args_into_dataclasses(flags)


def test_quantized_host_needs_lora():
    @dataclasses.dataclass
    class Host:
        bits: int = 16
        lora_enable: bool = False

    extended = extend_arguments(Host)
    with pytest.raises(ValueError, match="needs --lora_enable True"):
        extended(bits=4, visual_region="uniform_0.25")
    assert extended(bits=4, lora_enable=True, visual_region="uniform_0.25").region_spec == "uniform_0.25"
    assert extended(bits=4).region_spec is None  # no region, no objection


def test_argparse_flags():
    parser = add_region_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--visual_region", "last_4", "--tune_norm", "--tune_projector", "false"])
    region = region_arguments_from(ns)
    assert region.region_spec == "last_4" and region.tune_norm is True and region.tune_projector is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--tune_norm", "maybe"])
    with pytest.raises(ValueError, match="both given"):
        region_arguments_from(parser.parse_args(["--visual_region", "all", "--tune_layers", "1"]))
