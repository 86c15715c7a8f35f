"""Prov-GigaPath's own slide encoder against longvit_slide_base.gigapath on one GPU.

Both models hold the same random weights (theirs, mapped by longvit's checkpoint filter);
inference, batch 1, bf16 autocast, one slide of N tiles at random cells of the 1000 x 1000
grid. Prints per N the median time, the peak device memory, and how far the two
embeddings are apart (bf16, so about 1e-2 is expected).

Their code is imported from a folder given on the command line, never from the project:

    PEER=peers/gp                       # any folder outside git (e.g. in .git/info/exclude)
    mkdir -p $PEER
    git clone https://github.com/prov-gigapath/prov-gigapath /tmp/pg
    cp -r /tmp/pg/gigapath $PEER/
    # under NumPy 2 their get_optimal_segment_length must return
    #   str([int(s) for s in segment_length])       (gigapath/slide_encoder.py)
    # $PEER/fairscale/nn/__init__.py: checkpoint_wrapper(m, *a, **k) and wrap(m, *a, **k)
    #   that return m (their encoder imports them; unused for this model)
    # $PEER/flash_attn/flash_attn_interface.py: flash_attn_func(q, k, v, dropout_p=0.0,
    #   softmax_scale=None, causal=False, return_attn_probs=False) -> (out, lse, None) on
    #   (B, L, H, D) tensors, e.g. over torch.ops.aten._scaled_dot_product_flash_attention
    #   (flash-attn itself, where it is installed, needs no stand-in)
    # einops and timm must be importable

    PYTHONPATH=. python tools/bench_gigapath.py --gigapath-code $PEER [--tiles 1000 10000 65000]
"""

from __future__ import annotations

import argparse
import importlib
import sys

import timm
import torch

import longvit  # noqa: F401
from longvit.models.gigapath import gigapath_checkpoint_filter_fn
from tools.harness import median_seconds, peak_gib, reset_peak


def peak(fn) -> tuple[float, float, torch.Tensor]:
    """(median seconds, peak GiB, output) of an inference call."""
    reset_peak("cuda")
    seconds = median_seconds(fn, "cuda")
    out = fn()
    return seconds, peak_gib("cuda"), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigapath-code", required=True, help="folder holding their gigapath/")
    parser.add_argument("--tiles", type=int, nargs="+", default=[1000, 10000, 65000])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gigapath.py needs a CUDA GPU (their encoder runs on flash-attn)")
    sys.path.insert(0, args.gigapath_code)
    try:
        their_module = importlib.import_module("gigapath.slide_encoder")
    except ImportError as error:
        raise SystemExit(
            f"their gigapath package does not import from {args.gigapath_code}: {error} "
            "(see this script's docstring for the folder's set-up)"
        ) from error
    dev = "cuda"
    torch.manual_seed(0)
    theirs = their_module.gigapath_slide_enc12l768d(in_chans=1536, global_pool=True)
    theirs = theirs.to(dev).eval()
    ours = timm.create_model("longvit_slide_base.gigapath", num_classes=0).to(dev).eval()
    ours.load_state_dict(gigapath_checkpoint_filter_fn(theirs.state_dict(), ours))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16 autocast, batch 1")
    print("| tiles | Prov-GigaPath (their code) | peak GiB | longvit_slide_base.gigapath "
          "| peak GiB | speed-up | max abs diff | relative diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for n in args.tiles:
        print(row(theirs, ours, n, dev), flush=True)
        torch.cuda.empty_cache()


def row(theirs, ours, n: int, dev: str) -> str:
    """One table row: both encoders on the same slide of n tiles."""
    g = torch.Generator().manual_seed(n)
    feats = torch.randn(1, n, 1536, generator=g).to(dev)
    cells = torch.randperm(1000 * 1000, generator=g)[:n]
    grid = torch.stack([cells // 1000, cells % 1000], -1)[None].to(dev)
    coords = grid.float() * 256  # their input: floor(coords / 256) is the grid
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        try:
            t_gp, m_gp, ref = peak(lambda: theirs(feats, coords)[0])
            their_cell = f"{t_gp * 1e3:.1f} ms | {m_gp:.1f}"
        except torch.cuda.OutOfMemoryError:
            t_gp, ref, their_cell = None, None, "out of memory | -"
        t_lv, m_lv, out = peak(lambda: ours(feats, grid))
    speedup = f"{t_gp / t_lv:.2f}x" if t_gp else "-"
    diffs = "- | -"
    if ref is not None:
        delta = out.float() - ref.float()
        diffs = f"{delta.abs().max().item():.2e} | {(delta.norm() / ref.float().norm()).item():.2e}"
    return f"| {n:,} | {their_cell} | {t_lv * 1e3:.1f} ms | {m_lv:.1f} | {speedup} | {diffs} |"


if __name__ == "__main__":
    main()
