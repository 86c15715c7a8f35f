"""The CLI as a user types it: typed nested kwargs overrides, kwargs merged over several
--config files, precision from the device, the survival recipe on a survival manifest."""

from __future__ import annotations

import pytest
import torch
import yaml

from longvit.cli import main as longvit_main
from longvit.demo.feature_cohort import make_feature_cohort
from longvit.training.cli import run_cli
from longvit.training.cli_arguments import kwargs_overrides

TINY = ["--model.init_args.model_name", "longvit_slide_small",
        "--model.init_args.model_kwargs.embed_dim", "32", "--model.init_args.model_kwargs.depth",
        "1", "--model.init_args.model_kwargs.num_heads", "2"]  # fmt: skip


def test_kwargs_overrides_are_typed_and_merged(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"model": {"init_args": {"model_kwargs": {
        "in_chans": 1536, "global_pool": "avg", "drop_path_rate": 0.1}}}}))  # fmt: skip
    second.write_text(yaml.safe_dump({"model": {"init_args": {"model_kwargs": {"depth": 2}}}}))
    rest, merged = kwargs_overrides(["--config", str(first), f"--config={second}",
                                     "--model.init_args.model_kwargs.in_chans", "192",
                                     "--model.init_args.model_kwargs.class_token=false",
                                     "--trainer.max_steps", "1"])  # fmt: skip
    assert rest == ["--config", str(first), f"--config={second}", "--trainer.max_steps", "1"]
    assert merged == {("model", "init_args", "model_kwargs"): {
        "in_chans": 192, "global_pool": "avg", "drop_path_rate": 0.1, "depth": 2,
        "class_token": False}}  # fmt: skip


@pytest.fixture(scope="module")
def survival_cohort(tmp_path_factory):
    return make_feature_cohort(
        tmp_path_factory.mktemp("surv"), n_slides=8, tiles=(20, 30), dim=8, task="survival"
    )


def test_shipped_survival_recipe_one_step_on_cpu(survival_cohort, tmp_path):
    cli = run_cli(["fit", "--config", "configs/survival_features.yaml",
                   "--data.init_args.manifest", str(survival_cohort),
                   "--data.init_args.num_workers", "0", "--data.init_args.n_time_bins", "2",
                   "--model.init_args.n_time_bins", "2", *TINY,
                   "--model.init_args.model_kwargs.in_chans", "8",
                   "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu",
                   "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    kwargs = cli.model.hparams["model_kwargs"]
    # typed, and merged with the recipe's own keys (global_pool, class_token stay)
    assert kwargs["in_chans"] == 8 and kwargs["global_pool"] == "avg" and not kwargs["class_token"]
    assert type(cli.model).__name__ == "SlideSurvival"
    assert cli.trainer.precision == ("bf16-mixed" if torch.cuda.is_available() else "32-true")


def test_wrong_width_names_the_fix(survival_cohort, tmp_path, capsys):
    with pytest.raises(SystemExit):
        longvit_main(["fit", "--config", "configs/survival_features.yaml",
                      "--data.init_args.manifest", str(survival_cohort),
                      "--data.init_args.num_workers", "0", "--data.init_args.n_time_bins", "2",
                      "--model.init_args.n_time_bins", "2", *TINY, "--trainer.fast_dev_run", "1",
                      "--trainer.accelerator", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert "hold D=8 features" in err and "--model.init_args.model_kwargs.in_chans 8" in err
    assert "Traceback" not in err
