"""The ``longvit`` command: one entry point, one subcommand per job.

Each subcommand lives beside the code it drives and is imported only when
called, so ``longvit tile`` never imports Lightning and ``longvit fit`` never
imports OpenSlide unless it needs to.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "tile": (
        "longvit.slides.tile_command",
        "main",
        "tile slides at a target mpp into HDF5 coords + thumbnails",
    ),
    "generate": ("longvit.generate_command", "main", "reports/captions from slide features"),
    "extract": (
        "longvit.extract.command",
        "main",
        "tile features (a published encoder or any timm model) into HDF5 per slide",
    ),
    "export": (
        "longvit.extract.export_command",
        "main",
        "tile features in CLAM's or TRIDENT's layout (h5_files/pt_files, features_<encoder>)",
    ),
    "fit": ("longvit.training.cli", "fit", "train a slide model (LightningCLI; --config YAML)"),
    "validate": ("longvit.training.cli", "validate", "evaluate on the manifest's val split"),
    "test": ("longvit.training.cli", "test", "evaluate on the manifest's test split"),
    "predict": (
        "longvit.training.cli",
        "predict",
        "per-slide predictions CSV and heatmaps",
    ),
    "lm-eval": (
        "longvit.training.lm_eval_command",
        "main",
        "perplexity of a language-model checkpoint at several contexts (held-out files)",
    ),
    "manifest": (
        "longvit.training.manifest_command",
        "main",
        "a manifest CSV from a slide folder and a labels CSV",
    ),
    "split": (
        "longvit.training.splits",
        "main",
        "patient-level, stratified cross-validation folds of a manifest",
    ),
    "folds-summary": (
        "longvit.training.folds_summary",
        "main",
        "mean ± sd of the metrics of cross-validation runs",
    ),
    "demo": (
        "longvit.demo.pipeline",
        "main",
        "synthetic cohort -> tiles -> features -> slide classifier -> AUROC + heatmaps",
    ),
    "env": (
        "longvit.env_command",
        "main",
        "versions, GPU, and the attention backends auto picks here (for bug reports)",
    ),
}


def register(name: str, module: str, function: str, help_text: str) -> None:
    """Add a subcommand (used by the slides, extraction and training layers)."""
    SUBCOMMANDS[name] = (module, function, help_text)


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    rows = "\n".join(f"  {n.ljust(width)}  {h}" for n, (_, _, h) in SUBCOMMANDS.items())
    return (
        f"usage: longvit <command> [options]\n\ncommands:\n{rows}\n\n"
        "Run `longvit <command> --help` for a command's options."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"longvit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, function, _ = SUBCOMMANDS[name]
    result = getattr(importlib.import_module(module), function)(rest)
    return int(result or 0)
