"""What the command line means before Lightning's parser reads it.

- ``--model.init_args.model_kwargs.in_chans 192`` (any ``..._kwargs.KEY``): the value is read
  as YAML (192 is a number, true a bool, [1, 2] a list), not passed on as the string "192".
- Several ``--config`` files: their ``..._kwargs`` dicts are merged key by key, later files
  winning, instead of the last file's dict replacing the whole dict; ``..._kwargs.KEY`` on the
  command line then overrides single keys, and a whole dict given on the command line
  (``--model.init_args.model_kwargs "{in_chans: 8}"``) overrides the keys it names.
- ``trainer.precision`` follows the device unless it is set: "bf16-mixed" where a CUDA GPU
  with bf16 will run the model, "32-true" otherwise.

``kwargs_overrides`` collects both kinds of values and ``apply_kwargs_overrides`` writes them
into the parsed config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

_KWARGS_SUFFIX = "_kwargs"


def kwargs_overrides(args: Sequence[str]) -> tuple[list[str], dict[tuple[str, ...], dict]]:
    """(arguments without the ``..._kwargs.KEY`` ones, {dotted path of a kwargs dict: merged
    dict}) for ``args`` of one subcommand (see the module docstring)."""
    rest: list[str] = []
    merged: dict[tuple[str, ...], dict] = {}
    cli: dict[tuple[str, ...], dict] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name, has_value, value = arg.partition("=")
        if name == "--config" and i + 1 < len(args) or name == "--config" and has_value:
            file = value if has_value else args[i + 1]
            _merge_config_kwargs(Path(file), merged)
        parts = name[2:].split(".") if name.startswith("--") else []
        at = next((k for k, p in enumerate(parts[:-1]) if p.endswith(_KWARGS_SUFFIX)), None)
        if at is not None and at == len(parts) - 2:
            if not has_value:
                if i + 1 >= len(args):
                    rest.append(arg)  # the parser names the missing value
                    break
                value, i = args[i + 1], i + 1
            cli.setdefault(tuple(parts[: at + 1]), {})[parts[-1]] = yaml.safe_load(value)
        elif parts and parts[-1].endswith(_KWARGS_SUFFIX) and (has_value or i + 1 < len(args)):
            whole = value if has_value else args[i + 1]  # the whole dict, e.g. "{in_chans: 8}"
            rest.extend([arg] if has_value else [arg, whole])
            i += 0 if has_value else 1
            try:
                values = yaml.safe_load(whole)
            except yaml.YAMLError:
                values = None  # the parser names the malformed value
            if isinstance(values, dict):
                cli.setdefault(tuple(parts), {}).update(values)
        else:
            rest.append(arg)
        i += 1
    for path, values in cli.items():
        merged.setdefault(path, {}).update(values)
    return rest, merged


def _merge_config_kwargs(file: Path, merged: dict[tuple[str, ...], dict]) -> None:
    try:
        content = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError):
        return  # the parser reports an unreadable config itself
    for path, values in _kwargs_dicts(content, ()):
        merged.setdefault(path, {}).update(values)


def _kwargs_dicts(node, path: tuple[str, ...]):
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if str(key).endswith(_KWARGS_SUFFIX) and isinstance(value, dict):
            yield (*path, str(key)), value
        elif isinstance(value, dict):
            yield from _kwargs_dicts(value, (*path, str(key)))


def apply_kwargs_overrides(config, merged: dict[tuple[str, ...], dict]) -> None:
    """Write the merged kwargs dicts into a parsed subcommand config (a jsonargparse
    Namespace, or a dict), keeping keys it holds that no file or argument named."""
    for path, values in merged.items():
        node = config
        for part in path[:-1]:
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                break
        if node is None:
            continue
        current = node.get(path[-1]) or {}
        node[path[-1]] = {**dict(current), **values}


def default_precision(accelerator: str | None) -> str:
    """The precision a config that does not set one runs at on this machine."""
    import torch

    gpu = accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"
