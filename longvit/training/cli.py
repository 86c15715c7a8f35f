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

``--ckpt_path`` is read without running code from the file (``longvit.weights_file``) before
anything is built: a file that is no Lightning checkpoint, one that names a model class not
imported by the config, or one whose weights do not fit the configured model ends the command
with a message naming the file. Lightning then restores it with ``weights_only=True`` (not an
option: a checkpoint never runs pickled code here).
"""

from __future__ import annotations

import inspect
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI

from longvit.training.cli_arguments import (
    apply_kwargs_overrides,
    default_precision,
    kwargs_overrides,
)
from longvit.training.manifest import ManifestError
from longvit.weights_file import WeightsFileError, read_lightning_checkpoint

# --ckpt_path values Lightning resolves to its own files
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")


class LongViTCLI(LightningCLI):
    """LightningCLI with subclass-mode model and data, user errors reported by the parser, and
    checkpoints read safely (see the module docstring)."""

    _checkpoint_shapes: dict[str, tuple[int, ...]] | None = None

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # weights_only is no option: the subcommands below always pass True
        return {name: {*skip, "weights_only"} for name, skip in LightningCLI.subcommands().items()}

    def parse_arguments(self, parser, args) -> None:
        # typed ..._kwargs.KEY overrides, kwargs dicts merged over --config files, precision
        # from the device (longvit.training.cli_arguments)
        rest, merged = kwargs_overrides(list(args) if args is not None else sys.argv[1:])
        super().parse_arguments(parser, rest)
        subcommand = self.config.get("subcommand")
        if subcommand:
            apply_kwargs_overrides(self.config[subcommand], merged)
            trainer = self.config[subcommand].get("trainer")
            if trainer is not None and trainer.get("precision") is None:
                trainer["precision"] = default_precision(trainer.get("accelerator"))
        # before LightningCLI reads the checkpoint's hyper-parameters into the config
        try:
            self._checkpoint_shapes = _read_ckpt_path(self.config, self._configured_model_class())
        except WeightsFileError as err:
            parser.error(str(err))

    def _configured_model_class(self) -> type | None:
        """The LightningModule class the parsed config builds (imported while parsing)."""
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        class_path = model.get("class_path") if hasattr(model, "get") else None
        if class_path:
            return _imported_module_class(class_path)
        return None if self.subclass_mode_model else self.model_class

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, ManifestError) as err:
            self.parser.error(_root_message(err))

    def before_fit(self) -> None:
        self._check_data()
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_data()
        self._check_checkpoint()

    def before_validate(self) -> None:
        self._check_data()
        self._check_checkpoint()

    def before_predict(self) -> None:
        self._check_data()
        self._check_checkpoint()

    # Lightning's subcommands, restoring --ckpt_path with weights_only=True
    def fit(self, **kwargs) -> None:
        self.trainer.fit(weights_only=True, **kwargs)

    def validate(self, **kwargs) -> None:
        self.trainer.validate(weights_only=True, **kwargs)

    def test(self, **kwargs) -> None:
        self.trainer.test(weights_only=True, **kwargs)

    def predict(self, **kwargs) -> None:
        self.trainer.predict(weights_only=True, **kwargs)

    def _check_data(self) -> None:
        """Read and validate the manifest now, so a missing file fails before any training."""
        load = getattr(self.datamodule, "load_manifest", None)
        if load is not None:
            try:
                load()
            except (ValueError, FileNotFoundError, ManifestError) as err:
                self.parser.error(f"{type(err).__name__}: {err}")
        dim = getattr(self.datamodule, "feature_dim", None)
        network = getattr(self.model, "model", None)
        in_chans = getattr(network, "in_chans", None)
        if dim is not None and in_chans is not None and dim != in_chans:
            self.parser.error(
                f"the feature files of {self.datamodule.manifest_path} hold D={dim} features but "
                f"the model expects in_chans={in_chans}; pass "
                f"--model.init_args.model_kwargs.in_chans {dim} (or set it in the config)"
            )

    def _check_checkpoint(self) -> None:
        """--ckpt_path's weights must fit the model built from the config (names and shapes)."""
        if self._checkpoint_shapes is None:
            return
        path = self.config[self.subcommand]["ckpt_path"]
        message = checkpoint_mismatch(
            self._checkpoint_shapes, self.model, strict=self.model.strict_loading
        )
        if message:
            self.parser.error(
                f"{path}: {message}; expected a checkpoint of the configured "
                f"{type(self.model).__name__} (the model and model.init_args it was trained with)"
            )


def _read_ckpt_path(config, model_class: type | None) -> dict[str, tuple[int, ...]] | None:
    """The parameter shapes of the subcommand's --ckpt_path, after checking the file (None:
    no checkpoint, or one Lightning resolves itself: "last", "best", "hpc", a URL).

    LightningCLI builds the model from the checkpoint's hyper-parameters (its class too, when
    it names one): the class must be an imported LightningModule and take those arguments.
    """
    subcommand = config.get("subcommand")
    path = config[subcommand].get("ckpt_path") if subcommand else None
    if not path or str(path) in LIGHTNING_CKPT_NAMES or "://" in str(path):
        return None
    expected = "a Lightning checkpoint for --ckpt_path (e.g. runs/.../best.ckpt)"
    checkpoint = read_lightning_checkpoint(path, expected)
    hparams = checkpoint.get("hyper_parameters")
    hparams = hparams if isinstance(hparams, dict) else {}
    class_path = hparams.get("_class_path")
    if class_path is not None:
        model_class = _imported_module_class(class_path)
        if model_class is None:
            raise WeightsFileError(
                f"{path}: names the model class {class_path!r}, which is not an imported "
                "LightningModule; longvit builds only the classes its config names. Set "
                "model.class_path in the config to the class the checkpoint was trained with"
            )
    unknown = _unknown_arguments(model_class, hparams) if model_class is not None else []
    if unknown:
        raise WeightsFileError(
            f"{path}: saved by a model with the arguments {unknown[:6]}, which "
            f"{model_class.__name__} does not take; expected {expected} of a "
            f"{model_class.__name__} (the class model.class_path names)"
        )
    return {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if torch.is_tensor(v)}


def checkpoint_mismatch(
    saved: dict[str, tuple[int, ...]], model: torch.nn.Module, strict: bool = True
) -> str:
    """How saved parameter shapes differ from the model's ("" when they fit)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    differ = sorted(k for k in own.keys() & saved.keys() if own[k] != saved[k])
    if differ:
        shapes = ", ".join(f"{k} {saved[k]} vs {own[k]}" for k in differ[:3])
        problems.append(f"{len(differ)} weight(s) of other shapes ({shapes})")
    if strict:
        for what, keys in (("missing", own.keys() - saved.keys()),
                           ("unexpected", saved.keys() - own.keys())):  # fmt: skip
            if keys:
                problems.append(f"{len(keys)} {what} weight(s) ({', '.join(sorted(keys)[:3])})")
    return "its weights do not fit the model: " + "; ".join(problems) if problems else ""


def _imported_module_class(class_path: str) -> type | None:
    """The LightningModule subclass at `class_path` if its module is imported, else None
    (nothing is imported on a checkpoint's word)."""
    module_name, _, name = str(class_path).rpartition(".")
    module = sys.modules.get(module_name)
    cls = getattr(module, name, None) if module is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, pl.LightningModule) else None


def _unknown_arguments(model_class: type, hparams: dict) -> list[str]:
    """Saved hyper-parameters the class's __init__ does not take; ``**kwargs`` passed on to a
    base class's __init__ are followed as jsonargparse follows them."""
    known: set[str] = set()
    for cls in model_class.__mro__:
        if cls in (pl.LightningModule, object):
            break
        init = vars(cls).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        known |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return sorted(k for k in hparams if not k.startswith("_") and k not in known)


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
