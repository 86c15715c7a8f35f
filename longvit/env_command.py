"""``longvit env``: what this machine gives longvit, for checking an install and for bug reports.

Prints the versions that matter (Python, torch, CUDA, cuDNN, the optional packages), the GPU,
which attention backends run on it for a dtype and head dim, the one ``backend="auto"`` picks
for training and for inference, whether the Triton data-movement kernels are on and how
FlashAttention-4's kernels are launched.

    longvit env                       # bf16, head dim 64, on the GPU if there is one
    longvit env --dtype float32 --head-dim 128 --device cpu
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

# distributions whose versions go into the report (None where not installed)
PACKAGES = (
    "timm",
    "lightning",
    "openslide-python",
    "openslide-bin",
    "albumentations",
    "h5py",
    "triton",
    "flash-attn-4",
    "nvidia-cutlass-dsl",
    "flash-attn",
)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def backend_rows(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[tuple[str, str]]:
    """(backend name, what it can do here) for every backend, for tensors of dtype and head_dim
    on device: "training", "inference only" (no exact merged backward) or why not."""
    from longvit.attention.backends import BACKENDS

    rows = []
    for name, backend in BACKENDS.items():
        if not backend.available(device, dtype, head_dim):
            rows.append((name, "not available"))
        elif backend.supports_backward:
            rows.append((name, "training" + ("" if backend.supports_dropout else ", no dropout")))
        else:
            rows.append((name, "inference only"))
    return rows


def report(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The text ``longvit env`` prints."""
    import longvit
    from longvit import config
    from longvit.attention.backends import resolve_backend

    lines = [f"longvit {longvit.__version__}, Python {platform.python_version()}, "
             f"torch {torch.__version__} ({platform.machine()})"]  # fmt: skip
    if torch.cuda.is_available():
        lines.append(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm{major}{minor})")
    else:
        lines.append("no CUDA device")
    found = [(p, _version(p)) for p in PACKAGES]
    lines.append("packages: " + ", ".join(f"{p} {v}" for p, v in found if v))
    lines.append("not installed: " + (", ".join(p for p, v in found if not v) or "-"))
    lines.append(f"attention backends for {str(dtype).removeprefix('torch.')}, head dim "
                 f"{head_dim}, on {device}:")  # fmt: skip
    for name, what in backend_rows(device, dtype, head_dim):
        lines.append(f"  {name:<10} {what}")
    train = resolve_backend("auto", device, dtype, head_dim, 0.0, needs_grad=True).name
    infer = resolve_backend("auto", device, dtype, head_dim, 0.0).name
    lines.append(f'backend="auto" picks: {train} for training, {infer} for inference')
    triton = "on" if config.use_triton() else "off (LONGVIT_TRITON=0 or a failed launch)"
    where = "" if device.type == "cuda" else " (used on CUDA tensors only)"
    lines.append(f"Triton data movement: {triton}{where}")
    lines.append(f"FlashAttention-4 launches: {fa4_launches()}")
    return "\n".join(lines)


def fa4_launches() -> str:
    """How FA4's kernels are launched: replayed from records (``attention.backends.fa4_launch``) or
    through its own wrapper, and why."""
    from longvit import config
    from longvit.attention.backends import fa4_launch

    version = fa4_launch.fa4_version()
    if version is None:
        return "- (flash-attn-4 not installed)"
    forced = " (LONGVIT_FA4_REPLAY)" if config.fa4_replay() is not None else ""
    if fa4_launch.replay_enabled(version):
        return f"replayed per call signature{forced}; LONGVIT_FA4_REPLAY=0 turns that off"
    if forced:
        return f"through FA4's wrapper{forced}"
    tested = ", ".join(fa4_launch.TESTED_VERSIONS)
    return (f"through FA4's wrapper: replays are tested with flash-attn-4 {tested}, this is "
            f"{version} (LONGVIT_FA4_REPLAY=1 replays anyway)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="longvit env", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32",
                                                            "float64"])  # fmt: skip
    p.add_argument("--head-dim", type=int, default=64, help="head dimension D (default 64)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device (use --device cpu)")
    if args.head_dim < 1:
        p.error(f"--head-dim must be positive, got {args.head_dim}")
    print(report(device, getattr(torch, args.dtype), args.head_dim))
    sys.stdout.flush()
    return 0
