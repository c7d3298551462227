"""The one typed run configuration (issue 11): the CLI's train options, the HTTP job body and the worker's job file
are the same model, so a setting cannot mean one thing in one place and another elsewhere."""

from __future__ import annotations

import json

import pytest

from crossmodalseg.cli import build_parser
from crossmodalseg.config import ConfigError, TrainConfig, TrainSettings, train_config_from_args
from crossmodalseg.service.schemas import FinetuneJob, TrainJob


def cli_config(*argv: str) -> TrainConfig:
    return train_config_from_args(build_parser().parse_args(["train", "data", "--out", "model", *argv]))


def test_the_cli_and_the_api_build_the_same_settings():
    from_cli = cli_config("--method", "mkd", "--target", "ct", "--assistant", "mr", "--minutes", "2", "--seed", "3",
                          "--option", "iam=histogram", "--option", "temperature=1.5", "--val-every", "2",
                          "--preset", "full", "--iterations-per-epoch", "7", "--device", "cpu")
    from_api = TrainJob.model_validate({"kind": "train", "dataset": "d", "method": "mkd", "target": "ct",
                                        "assistants": ["mr"], "minutes": 2, "seed": 3, "val_every": 2,
                                        "options": {"iam": "histogram", "temperature": 1.5}, "preset": "full",
                                        "iterations_per_epoch": 7, "device": "cpu"})
    shared = set(TrainSettings.model_fields)
    assert from_cli.model_dump(include=shared) == from_api.model_dump(include=shared)
    assert from_cli.options == {"iam": "histogram", "temperature": 1.5}  # only what was given: defaults stay
    assert from_cli.minutes == 2.0 and from_cli.epochs is None


def test_every_setting_has_its_cli_option():
    """The options are generated from the fields: a new field is on the command line without another copy."""
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001 - argparse keeps sub-parsers here
    dests = {a.dest for a in train._actions}  # noqa: SLF001
    assert set(TrainConfig.model_fields) - {"amp", "finetune_lr_factor"} <= dests


def test_the_worker_reads_back_exactly_what_the_server_wrote():
    config = cli_config("--method", "cmc", "--target", "flair", "--assistant", "t1c", "--epochs", "3",
                        "--option", "warmup=0.5", "--val-cases", "a", "b", "--init-from", "/models/base")
    assert TrainConfig.parse(json.loads(json.dumps(config.model_dump(mode="json")))) == config


def test_a_run_file_of_an_earlier_version_is_still_read():
    old = {"method": "single", "target": "ct", "assistants": [], "preset": "fast", "epochs": 4, "minutes": None,
           "iterations_per_epoch": None, "device": "cpu", "seed": 0, "checkpoint_every": 1, "val_every": 5,
           "val_cases": None, "hparams": {"width": 0.5}, "init_from": None, "finetune_lr_factor": 0.3, "amp": True}
    assert TrainConfig.parse(old).options == {"width": 0.5}


@pytest.mark.parametrize("given, message", [
    ({"epochs": 2, "minutes": 1.0}, "not both"),
    ({"epochs": 0}, "epochs: Input should be greater than or equal to 1"),
    ({"minutes": float("nan")}, "minutes"),
    ({"minutes": float("inf")}, "minutes"),
    ({"seed": -1}, "seed"),
    ({"epoch": 3}, "epoch: Extra inputs are not permitted"),
    ({"method": "magic"}, "unknown method 'magic'"),
    ({"target": "ct\n"}, "target: use 1-128 letters"),
    ({"target": "ct", "assistants": ["ct"]}, "once"),
    ({"options": {"depth": 3}}, "no option 'depth' (it has: width)"),
    ({"options": {"width": 100.0}}, "option width: Input should be less than or equal to 4"),
    ({"method": "mkd", "options": {"iam": "magic"}}, "option iam: Input should be 'none', 'histogram' or 'cyclegan'"),
    ({"method": "maml", "options": {"modality_dropout": True}}, "modality_dropout"),
    ({"epochs": "3"}, "epochs: Input should be a valid integer"),
    ({"options": {"width": {"x": 1}}}, "options.width: an option is a number, a string or true/false"),
    ({"options": {"width": float("inf")}}, "options.width: numbers must be finite"),
])
def test_bad_settings_are_refused_naming_the_field(given, message):
    with pytest.raises(ConfigError) as refused:
        TrainConfig.parse(given)
    assert message in str(refused.value), str(refused.value)


def test_a_fine_tuning_job_chooses_only_its_budget():
    """Method, modalities and options of a fine-tuning are the base model's: the job cannot name others."""
    FinetuneJob.model_validate({"kind": "finetune", "dataset": "d", "model": "m", "minutes": 1})
    with pytest.raises(Exception, match="method"):
        FinetuneJob.model_validate({"kind": "finetune", "dataset": "d", "model": "m", "method": "mkd"})


def test_crossmodalseg_info_lists_every_method_option_that_train_takes():
    """`--option NAME=VALUE` points users at `crossmodalseg info`: it must list every option of every method (as GET
    /info does), each default must be one `train` accepts, and a name it does not list must be refused."""
    import subprocess
    import sys

    from crossmodalseg.errors import UserError
    from crossmodalseg.methods import METHODS

    run = subprocess.run([sys.executable, "-m", "crossmodalseg.cli", "info"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert set(info["methods"]) == set(info["method_options"]) == set(METHODS) == {"single", "mkd", "maml", "cmc"}
    assert info["presets"] == ["fast", "full"]
    for name, options in info["method_options"].items():
        assert set(options) == set(METHODS[name].Options.model_fields), name
        assert METHODS[name].check_options(options) == options
        config = cli_config("--method", name, *(a for k, v in options.items() for a in ("--option", f"{k}={v}")))
        assert config.options == options
        with pytest.raises(UserError, match="no option 'not_an_option'"):
            METHODS[name].check_options({"not_an_option": 1})
