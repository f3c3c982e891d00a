"""Trainer options: flags generated from method configs, config files, refusals."""

import argparse
import dataclasses
import json
import typing

import pytest

import difftune
from difftune.errors import DifftuneError
from difftune.training import arguments
from difftune.tuners.base import AdapterConfig, option
from difftune.tuners.lora import LoraAdapter


def full_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    arguments.add_model_arguments(parser)
    arguments.add_training_arguments(parser)
    return parser


def _example_value(annotation):
    """A value of the field's type that differs from any default."""
    members = typing.get_args(annotation) or (annotation,)
    if bool in members:
        return True
    if int in members:
        return 3
    if float in members:
        return 0.25
    return "xyz"


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
def test_every_method_option_becomes_a_flag_that_reaches_the_config(method):
    parser = full_parser()
    fields = arguments.method_fields(difftune.METHODS[method])
    assert fields, f"{method} has no options"
    argv = ["--adapter", method]
    expected = {}
    for field, annotation in fields:
        dest = arguments.option_dest(method, field.name)
        assert f"--{dest}" in parser.format_help()
        value = _example_value(annotation)
        argv += [f"--{dest}"] + ([] if annotation is bool else [str(value)])
        expected[field.name] = value
    args = arguments.parse_with_config(parser, argv)
    assert arguments.adapter_options(args, method) == expected


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
def test_flags_not_given_keep_the_method_defaults(method):
    args = arguments.parse_with_config(full_parser(), ["--adapter", method])
    assert arguments.adapter_options(args, method) == {}


def test_lora_flags_use_the_diffusers_names():
    parser = full_parser()
    a = arguments.parse_with_config(parser, ["--rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.1",
                                             "--use_dora", "--lora_init", "true"])
    b = arguments.parse_with_config(parser, ["--rank", "8", "--alpha", "16", "--lora_dropout", "0.1",
                                             "--lora_use_dora", "--lora_init", "True"])
    expected = {"rank": 8, "alpha": 16.0, "dropout": 0.1, "use_dora": True, "init": True}
    assert arguments.adapter_options(a, "lora") == arguments.adapter_options(b, "lora") == expected
    assert isinstance(expected["rank"], int)
    gaussian = arguments.parse_with_config(parser, ["--lora_init", "gaussian"])
    assert arguments.adapter_options(gaussian, "lora") == {"init": "gaussian"}


@dataclasses.dataclass
class _ToyConfig(AdapterConfig):
    rank: int | str | None = option(None, "toy rank: a number or 'full'")
    threshold: float = option(1e-3, "toy threshold, a fraction (0.5 is 50%)")
    mode: typing.Literal["a", "b"] = option("a", "toy mode")
    progressive: bool = option(False, "toy switch")
    budget: int | float | None = option(None, "count or fraction")


class _ToyAdapter(LoraAdapter):
    method = "toy"
    config_class = _ToyConfig


def test_a_newly_registered_method_gets_prefixed_and_shared_flags(monkeypatch):
    monkeypatch.setitem(difftune.METHODS, "toy", _ToyAdapter)
    parser = full_parser()
    args = arguments.parse_with_config(parser, ["--adapter", "toy", "--rank", "5", "--toy_threshold", "0.5",
                                                "--toy_mode", "b", "--toy_progressive", "--toy_budget", "10"])
    options = arguments.adapter_options(args, "toy")
    assert options == {"rank": 5, "threshold": 0.5, "mode": "b", "progressive": True, "budget": 10}
    assert isinstance(options["budget"], int)
    fraction = arguments.parse_with_config(parser, ["--adapter", "toy", "--toy_budget", "0.05"])
    assert arguments.adapter_options(fraction, "toy") == {"budget": 0.05}
    help_text = " ".join(parser.format_help().split())
    assert "toy: toy rank: a number or 'full' (default: None)" in help_text
    assert "lora: rank r of B·A" in help_text
    assert "(0.5 is 50%)" in help_text
    # the shared --rank accepts what any method takes: LoRA's ints and the toy's 'full'
    full = arguments.parse_with_config(parser, ["--adapter", "toy", "--rank", "full"])
    assert arguments.adapter_options(full, "toy") == {"rank": "full"}
    with pytest.raises(SystemExit):  # choices come from the Literal
        arguments.parse_with_config(parser, ["--toy_mode", "c"])
    lora_args = arguments.parse_with_config(parser, ["--adapter", "lora", "--toy_threshold", "0.5"])
    with pytest.raises(DifftuneError,
                       match=r"--toy_threshold is an option of --adapter toy, not of --adapter lora"):
        arguments.adapter_options(lora_args, "lora")


def test_shared_flag_refused_for_a_method_without_that_option(monkeypatch):
    @dataclasses.dataclass
    class NoRank(AdapterConfig):
        threshold: float = option(1e-3, "t")

    class NoRankAdapter(LoraAdapter):
        method = "norank"
        config_class = NoRank

    monkeypatch.setitem(difftune.METHODS, "norank", NoRankAdapter)
    args = arguments.parse_with_config(full_parser(), ["--adapter", "norank", "--rank", "4"])
    owners = r"--adapter (.*, )?lora(, .*)?"  # and every other registered method with a rank
    with pytest.raises(DifftuneError, match=f"--rank is an option of {owners}, not of --adapter norank"):
        arguments.adapter_options(args, "norank")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_values_and_flags_overriding_them(tmp_path, suffix):
    config = {"learning_rate": 3e-4, "rank": 6, "lora_alpha": 12, "gradient_checkpointing": True,
              "targets": ["attn", "conv"], "lr_scheduler": "cosine", "use_dora": False, "seed": 7}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(config))
    else:
        import yaml

        path.write_text(yaml.safe_dump(config))
    parser = full_parser()
    args = arguments.parse_with_config(parser, ["--config", str(path), "--rank", "9"])
    assert args.learning_rate == 3e-4 and args.gradient_checkpointing is True and args.seed == 7
    assert args.targets == ["attn", "conv"] and args.lr_scheduler == "cosine"
    assert arguments.adapter_options(args, "lora") == {"rank": 9, "alpha": 12.0, "use_dora": False}


def test_config_file_errors_name_the_file_and_key(tmp_path):
    parser = full_parser()
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("learning_rat: 1e-4\n")
    with pytest.raises(DifftuneError,
                       match=r"a.yaml: unknown option 'learning_rat' \(did you mean 'learning_rate'"):
        arguments.parse_with_config(parser, ["--config", str(bad_key)])
    bad_choice = tmp_path / "b.json"
    bad_choice.write_text('{"lr_scheduler": "sometimes"}')
    with pytest.raises(SystemExit):  # argparse checks choices of file values like flags
        arguments.parse_with_config(parser, ["--config", str(bad_choice)])
    not_mapping = tmp_path / "c.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(DifftuneError, match="c.yaml: expected a mapping"):
        arguments.parse_with_config(parser, ["--config", str(not_mapping)])
    broken = tmp_path / "d.json"
    broken.write_text("{")
    with pytest.raises(DifftuneError, match="d.json: cannot parse"):
        arguments.parse_with_config(parser, ["--config", str(broken)])
    with pytest.raises(DifftuneError, match="no such file"):
        arguments.parse_with_config(parser, ["--config", str(tmp_path / "missing.yaml")])


def test_family_flags_refused_on_the_other_noise_process():
    parser = full_parser()
    sd3_flags = arguments.parse_with_config(parser,
                                            ["--weighting_scheme", "cosmap", "--precondition_outputs"])
    with pytest.raises(DifftuneError, match=r"--weighting_scheme, --precondition_outputs only apply to SD3"):
        arguments.check_family_flags(sd3_flags, "sdxl")
    arguments.check_family_flags(sd3_flags, "sd3")
    snr = arguments.parse_with_config(parser, ["--snr_gamma", "5"])
    with pytest.raises(DifftuneError, match="--snr_gamma only apply to SD 1.x/2.x and SDXL"):
        arguments.check_family_flags(snr, "sd3")
    arguments.check_family_flags(snr, "sd")


@pytest.mark.parametrize(("argv", "message"), [
    (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
    (["--noise_offset", "-0.1"], "--noise_offset must not be negative"),
    (["--snr_gamma", "0"], "--snr_gamma must be positive"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be at least 1"),
    (["--mixed_precision", "fp16"], "fp16 needs a CUDA GPU"),
    (["--use_8bit_adam"], "--use_8bit_adam needs bitsandbytes"),
    (["--enable_xformers_memory_efficient_attention"], "needs xformers, which is not installed"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf"),
    (["--learning_rate", "1e30"], r"--learning_rate must be in \(0, 1\]"),
    (["--learning_rate", "0"], r"--learning_rate must be in \(0, 1\]"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number"),
    (["--alpha=-inf"], "--alpha must be a finite number"),
    (["--adam_beta1", "2"], r"--adam_beta1 must be in \[0, 1\), got 2.0"),
    (["--adam_beta2", "1"], r"--adam_beta2 must be in \[0, 1\)"),
    (["--adam_epsilon", "-1"], "--adam_epsilon must be positive, got -1.0"),
    (["--adam_epsilon", "0"], "--adam_epsilon must be positive"),
    (["--adam_weight_decay", "-0.5"], "--adam_weight_decay must not be negative"),
    (["--lr_num_cycles", "0"], "--lr_num_cycles must be at least 1"),
])
def test_out_of_range_values_and_missing_packages(argv, message):
    import importlib.util

    import torch

    if "fp16" in argv and torch.cuda.is_available():
        pytest.skip("fp16 is allowed with a GPU")
    for package in ("bitsandbytes", "xformers"):
        if package in message and importlib.util.find_spec(package) is not None:
            pytest.skip(f"{package} is installed")
    args = arguments.parse_with_config(full_parser(), argv)
    with pytest.raises(DifftuneError, match=message):
        arguments.check_common_arguments(args)


def test_flag_table_lists_every_flag_with_its_default():
    parser = full_parser()
    table = arguments.flag_table_markdown(parser, skip_groups=[arguments.METHOD_GROUP_TITLE])
    assert "| `--learning_rate` |" in table and "| `--lr_scheduler` | `constant` |" in table
    assert "--lora_dropout" not in table
