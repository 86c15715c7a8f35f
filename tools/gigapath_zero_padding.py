"""How much Prov-GigaPath's zero-padded keys change its slide embedding (CPU, float32).

longvit_slide_base.gigapath reproduces Prov-GigaPath's attention, in which the zero keys
that pad partial segments enter the softmax (``zero_padded_keys=True``); the exact masked
semantics (``zero_padded_keys=False``) leave them out. This prints, per tile count N, the
relative difference ||e_padded - e_masked|| / ||e_masked|| of the 768-d embedding and the
cosine similarity of the two, on the same tiles (random features, random grid cells).

    PYTHONPATH=. python tools/gigapath_zero_padding.py                 # random weights
    PYTHONPATH=. python tools/gigapath_zero_padding.py --weights slide_encoder.pth
"""

from __future__ import annotations

import argparse

import timm
import torch

import longvit  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="slide_encoder.pth (default: random weights)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[100, 1000, 1500, 3000, 5000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    overlay = dict(file=args.weights) if args.weights else None
    models = {}
    for padded in (True, False):
        torch.manual_seed(args.seed)
        models[padded] = timm.create_model(
            "longvit_slide_base.gigapath", pretrained=overlay is not None,
            pretrained_cfg_overlay=overlay, num_classes=0, zero_padded_keys=padded,
        ).eval()  # fmt: skip
    weights = args.weights or f"random (longvit init, seed {args.seed})"
    print(f"weights: {weights}")
    print("| tiles | zero keys per query (mean) | relative difference | cosine |")
    print("|---|---|---|---|")
    for n in args.tiles:
        g = torch.Generator().manual_seed(n)
        feats = torch.randn(1, n, 1536, generator=g)
        cells = torch.randperm(1000 * 1000, generator=g)[:n]
        grid = torch.stack([cells // 1000, cells % 1000], -1)[None]
        with torch.no_grad():
            padded, masked = (models[p](feats, grid)[0] for p in (True, False))
        rel = ((padded - masked).norm() / masked.norm()).item()
        cos = torch.nn.functional.cosine_similarity(padded, masked, dim=0).item()
        print(f"| {n:,} | {zero_keys(models[True], n + 1):.2f} | {rel:.2e} | {cos:.6f} |")


def zero_keys(model, tokens: int) -> float:
    """Mean over queries and heads of the zero keys a query's softmax holds (all branches)."""
    from longvit.attention.reference import null_keys

    attn = model.blocks[0].attn
    return float(null_keys(tokens, attn.num_heads, attn.schedule(tokens), attn.dilation_rates)
                 .double().mean())  # fmt: skip


if __name__ == "__main__":
    main()
