"""Reading weights and checkpoints without running code from the file.

Every file longvit takes weights from (``longvit extract --weights``, ``pretrained_file``,
``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` for longvit's models,
``--ckpt_path`` of ``longvit fit / validate / test / predict``, ``longvit generate
--checkpoint``) is read here: ``.safetensors`` by safetensors, anything else by
``torch.load(weights_only=True)``, whose unpickler builds tensors, containers and plain values
only and refuses every other class or function a pickle names (a pickle can otherwise run any
code while it loads). The one class allowed beyond torch's own list is ``argparse.Namespace``,
an attribute bag that timm's training script stores in its checkpoints.

A file that cannot be read that way, or that holds something other than what was asked for,
raises ``WeightsFileError`` naming the file, what was expected and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

# beyond torch's weights_only allowlist: timm's train.py stores its argparse.Namespace
SAFE_GLOBALS = [argparse.Namespace]
# timm's order (timm.models.load_state_dict): EMA weights first, then the trained ones
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# wrappers whose attribute names prefix every key: DistributedDataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"


class WeightsFileError(ValueError):
    """A weights / checkpoint file cannot be read safely, or holds something other than what
    was expected; the message names the file, what was expected and the fix."""


def read_weights_file(path: str | os.PathLike, expected: str) -> dict:
    """The dict stored in a weights file, read without running code from it.

    Args:
        path: a ``.safetensors`` file, or a file written by ``torch.save`` (.pth, .pt, .bin,
            .ckpt: a state dict or a checkpoint dict).
        expected: what the caller wants, for messages (e.g. "tile encoder weights for
            'vit_base_patch16_224' (--weights)").

    Tensors come back on the CPU; a ``torch.save`` zip file is memory-mapped, so reading a
    checkpoint costs little memory until its tensors are used.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such file; expected {expected}")
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{path}: the file is empty; expected {expected}")
    if path.suffix == ".safetensors":
        content = _read_safetensors(path, expected)
    else:
        content = _read_torch_file(path, expected)
    if not isinstance(content, dict):
        raise WeightsFileError(
            f"{path}: holds a {type(content).__name__}, not a dict of tensors; expected {expected}"
        )
    return content


def state_dict_of(content: dict, path: str | os.PathLike, expected: str) -> dict:
    """The state dict inside a checkpoint dict (or the dict itself), as timm picks it: EMA
    weights first, then "state_dict", then "model"; ``module.`` / ``_orig_mod.`` key prefixes
    (DistributedDataParallel, torch.compile) removed."""
    for key in STATE_DICT_KEYS:
        inner = content.get(key)
        if isinstance(inner, dict) and inner:
            content = inner
            break
    if not any(isinstance(v, torch.Tensor) for v in content.values()):
        keys = ", ".join(map(repr, list(content)[:8])) or "none"
        raise WeightsFileError(f"{path}: holds no tensors (its keys: {keys}); expected {expected}")
    return {_strip_wrappers(str(k)): v for k, v in content.items()}


def read_state_dict(path: str | os.PathLike, expected: str) -> dict:
    """``state_dict_of(read_weights_file(path))``: the weights of one network."""
    return state_dict_of(read_weights_file(path, expected), path, expected)


def read_lightning_checkpoint(path: str | os.PathLike, expected: str) -> dict:
    """A checkpoint written by Lightning (``Trainer.save_checkpoint``, ``ModelCheckpoint``):
    a dict with the Lightning version and the LightningModule's ``state_dict``."""
    content = read_weights_file(path, expected)
    state = content.get("state_dict")
    if LIGHTNING_VERSION_KEY not in content or not isinstance(state, dict):
        keys = ", ".join(map(repr, list(content)[:8])) or "none"
        raise WeightsFileError(
            f"{path}: not a Lightning checkpoint (no {LIGHTNING_VERSION_KEY!r} and "
            f"'state_dict' entries; its keys: {keys}); expected {expected}. Weights without "
            "training state start a model through model.init_args.pretrained_file or timm's "
            "pretrained_cfg_overlay=dict(file=...)"
        )
    return content


def weights_overlay(
    path: str | os.PathLike, expected: str, overlay: dict | None = None, whole: bool = False
) -> dict:
    """timm's ``pretrained_cfg_overlay`` that loads the weights in `path`, read here.

    whole: hand over the file's whole dict (for a checkpoint filter that maps a foreign
    layout, such as a DINO checkpoint's ``teacher``), not the state dict found in it.

    timm takes an in-memory state dict (the overlay's ``state_dict``) before a ``file``; the
    file's name stays in the overlay as the weights' provenance. timm then adapts the weights
    as for a file (the model's checkpoint_filter_fn, head and input-channel changes).
    Call ``forget_loaded_weights(model)`` afterwards so the model's pretrained_cfg does not
    keep the tensors alive.
    """
    state = read_weights_file(path, expected) if whole else read_state_dict(path, expected)
    return {**(overlay or {}), "file": str(path), "state_dict": state}


def forget_loaded_weights(model: torch.nn.Module) -> None:
    """Drop the state dict that ``weights_overlay`` put into the model's pretrained_cfg."""
    for module in model.modules():
        for name in ("pretrained_cfg", "default_cfg"):
            cfg = getattr(module, name, None)
            if isinstance(cfg, dict):
                cfg.pop("state_dict", None)


def _read_safetensors(path: Path, expected: str) -> dict:
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError: header too large / too small / invalid JSON
        raise WeightsFileError(
            f"{path}: not a safetensors file ({err}); expected {expected}"
        ) from err


def _read_torch_file(path: Path, expected: str) -> dict:
    is_zip = zipfile.is_zipfile(path)  # torch.save's format since PyTorch 1.6; mmap needs it
    try:
        with _allowed_globals():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        names = _refused_globals(path, err)
        if names:
            raise WeightsFileError(
                f"{path}: refused: unpickling it would call {', '.join(names)} (a pickle can "
                "run any function it names; weights need none of these, and longvit reads "
                f"pickles with weights_only=True); expected {expected}. Save weights as "
                "model.state_dict() (tensors only) or as .safetensors"
            ) from err
        raise WeightsFileError(
            f"{path}: not a PyTorch weights file ({_unpickler_detail(err)}); expected "
            f"{expected}. Pass a .safetensors file or one written by torch.save (.pth, .pt, "
            ".bin, .ckpt)"
        ) from err
    except Exception as err:  # junk: IndexError, EOFError, RuntimeError (bad zip), ...
        # the unpickler's own words ("pop from empty list") say nothing about the file
        if is_zip:
            what = "a damaged torch.save zip file (copy it again)"
        else:
            what = f"not a weights file: {_looks_like(path)}"
        raise WeightsFileError(
            f"{path}: {what}; expected {expected}. Pass a .safetensors file or one written by "
            "torch.save (.pth, .pt, .bin, .ckpt)"
        ) from err


def _looks_like(path: Path) -> str:
    """What a file that is not weights seems to be, from its first bytes (for messages)."""
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "its bytes are neither a pickle nor a zip nor safetensors"
    first = text.splitlines()[0][:60] if text.strip() else ""
    kind = "a CSV table" if "," in first or "\t" in first else "a text file"
    return f"it is {kind} (first line {first!r})"


def _allowed_globals():
    """SAFE_GLOBALS allowed for one torch.load (PyTorch 2.4 has only the global switch)."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(SAFE_GLOBALS)
    torch.serialization.add_safe_globals(SAFE_GLOBALS)
    return contextlib.nullcontext()


def _refused_globals(path: Path, err: Exception) -> list[str]:
    """The classes / functions the pickle names that weights_only refuses (read from its
    opcodes, never run)."""
    names = re.findall(r"GLOBAL ([\w.]+)", str(err))
    if not names:
        find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        try:  # a torch.save zip file
            names = list(find(str(path))) if find is not None else []
        except Exception:  # a plain pickle (or torch's legacy format)
            allowed = _allowed_global_names()
            names = [n for n in _pickle_globals(path) if n not in allowed]
    return sorted(set(names))


def _pickle_globals(path: Path, max_pickles: int = 5) -> list[str]:
    """Dotted names of the globals in the pickles at the start of a file (pickletools reads
    the opcodes without running them; torch's legacy format is a few pickles in a row)."""
    import pickletools

    names: list[str] = []
    with open(path, "rb") as f:
        for _ in range(max_pickles):
            strings: list[str] = []
            try:
                for opcode, arg, _ in pickletools.genops(f):
                    if opcode.name in ("GLOBAL", "INST"):
                        names.append(str(arg).replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(".".join(strings[-2:]))
                    if isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # the end of the pickles (tensor bytes follow) or junk
                break
    return names


def _allowed_global_names() -> set[str]:
    from torch import _weights_only_unpickler as unpickler

    allowed = getattr(unpickler, "_get_allowed_globals", dict)()
    user = getattr(unpickler, "_get_user_allowed_globals", dict)()
    return set(allowed) | set(user) | {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}


def _unpickler_detail(err: BaseException) -> str:
    """The reason in torch's weights_only message (its first lines only say to retry
    without weights_only, which is what this module never does)."""
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", str(err), re.DOTALL)
    return " ".join(found.group(1).split()) if found else _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key
