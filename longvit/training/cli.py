"""``longvit fit | validate | test | predict``: Lightning's CLI over longvit's modules.

    longvit fit --config configs/classification_features.yaml
    longvit fit --config configs/classification_features.yaml --model.init_args.lr 3e-4
    longvit test --config configs/classification_features.yaml --ckpt_path runs/x/best.ckpt
    longvit predict --config configs/classification_features.yaml --ckpt_path best.ckpt
    longvit fit --config configs/survival_features.yaml --print_config

``model`` and ``data`` take any LightningModule / LightningDataModule by ``class_path``
(``longvit.training.SlideClassifier``, ``longvit.training.FeatureDataModule``, ...) with
their ``init_args``; YAML is read by jsonargparse (safe loading). A value of the wrong type is
rejected by the parser naming the key; a value of the right type that a class refuses (a
label smoothing of 1.5, a manifest naming a missing file) ends the command with that class's
message instead of a traceback.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from longvit.training.manifest import ManifestError


class LongViTCLI(LightningCLI):
    """LightningCLI with subclass-mode model and data, and user errors reported by the parser."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, ManifestError) as err:
            self.parser.error(_root_message(err))

    def before_fit(self) -> None:
        self._check_data()

    def before_test(self) -> None:
        self._check_data()

    def before_validate(self) -> None:
        self._check_data()

    def before_predict(self) -> None:
        self._check_data()

    def _check_data(self) -> None:
        """Read and validate the manifest now, so a missing file fails before any training."""
        load = getattr(self.datamodule, "load_manifest", None)
        if load is not None:
            try:
                load()
            except (ValueError, FileNotFoundError, ManifestError) as err:
                self.parser.error(f"{type(err).__name__}: {err}")


def _root_message(err: BaseException) -> str:
    """The innermost error's message: jsonargparse wraps a class's own error in a report
    listing every Union subtype it tried; the user needs the class's sentence."""
    seen = err
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    return f"{type(seen).__name__}: {seen}"


def run_cli(argv: list[str]) -> LongViTCLI:
    """Run one subcommand with its arguments (``["fit", "--config", "x.yaml", ...]``)."""
    saved, sys.argv = sys.argv, sys.argv[:1]  # the arguments come from `argv` only
    try:
        return _cli(argv)
    finally:
        sys.argv = saved


def _cli(argv: list[str]) -> LongViTCLI:
    return LongViTCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"prog": f"longvit {argv[0] if argv else ''}".strip()},
    )


def fit(argv: list[str]) -> int:
    run_cli(["fit", *argv])
    return 0


def validate(argv: list[str]) -> int:
    run_cli(["validate", *argv])
    return 0


def test(argv: list[str]) -> int:
    run_cli(["test", *argv])
    return 0


def predict(argv: list[str]) -> int:
    run_cli(["predict", *argv])
    return 0


if __name__ == "__main__":
    run_cli(sys.argv[1:])
