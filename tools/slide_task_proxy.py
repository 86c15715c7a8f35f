#!/usr/bin/env python
"""A CPU-sized proxy of tools/bench_slide_task.py: does a small slide encoder learn the task?

Writes a "pair" feature cohort (``longvit.demo.feature_cohort``) and trains a 4-block, dim-64,
16-head ``longvit_slide_small`` on it with a plain loop (batch 1, AdamW), printing the mean
training loss every 100 steps and the held-out accuracy at the end. ``--attention`` picks the
dilated model as registered ("full"), its first branch only ("local") or dense attention over
the whole slide ("dense"). ``--label first-type`` asks instead whether the first region's type
is 0 or 1 (a question the summed features nearly answer), from the types the files record.

    PYTHONPATH=. python tools/slide_task_proxy.py --attention dense --seconds 600
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import longvit  # noqa: E402,F401  (registers the models)
from longvit.demo.feature_cohort import TILE_SIZE_LEVEL0, make_feature_cohort  # noqa: E402


def load(manifest: Path, label: str):
    """[(features (N, D), grid coords (N, 2), label, split)] of every slide."""
    slides = []
    for row in csv.DictReader(manifest.open()):
        with h5py.File(manifest.parent / row["features"], "r") as f:
            feats = torch.from_numpy(f["features"][:])
            coords = torch.from_numpy(f["coords"][:] // TILE_SIZE_LEVEL0)
            types = f["coords"].attrs["marker_types"]
        y = int(row["label"]) if label == "partner" else int(types[0] < 2)
        slides.append((feats, coords, y, row["split"]))
    return slides


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attention", default="full", choices=["full", "local", "dense"])
    p.add_argument("--label", default="partner", choices=["partner", "first-type"])
    p.add_argument("--slides", type=int, default=320)
    p.add_argument("--tiles", type=int, nargs=2, default=(800, 1200))
    p.add_argument("--dim", type=int, default=32, help="tile feature width")
    p.add_argument("--signal", type=float, default=3.0)
    p.add_argument("--region", type=float, nargs=2, default=(0.1, 0.15))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seconds", type=float, default=600, help="training time budget")
    p.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "longvit_slide_task_proxy",
        help="cohort folder (written once, reused)",
    )  # fmt: skip
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    manifest = args.workdir / "manifest.csv"
    if not manifest.exists():
        make_feature_cohort(
            args.workdir, n_slides=args.slides, tiles=tuple(args.tiles), dim=args.dim,
            task="pair", n_types=4, signal=args.signal, region=tuple(args.region),
            splits=(0.7, 0.1, 0.2), seed=0,
        )  # fmt: skip
    slides = load(manifest, args.label)
    kwargs = dict(in_chans=args.dim, embed_dim=64, depth=4, num_heads=16, num_classes=2,
                  class_token=False, global_pool="avg")  # fmt: skip
    longest = max(len(s[0]) for s in slides)
    if args.attention == "local":
        kwargs.update(segment_lengths=[64], dilation_rates=[1])
    elif args.attention == "dense":
        kwargs.update(segment_lengths=[longest], dilation_rates=[1])
    model = timm.create_model("longvit_slide_small", **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    train = [s for s in slides if s[3] == "train"]
    held_out = [s for s in slides if s[3] != "train"]
    start, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < args.seconds:
        for i in torch.randperm(len(train)).tolist():
            feats, coords, y, _ = train[i]
            loss = F.cross_entropy(model(feats[None], coords[None]), torch.tensor([y]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 100 == 0:
                elapsed = time.perf_counter() - start
                print(f"step {step}: mean training loss {np.mean(losses[-100:]):.3f} "
                      f"({elapsed:.0f} s)", flush=True)  # fmt: skip
            if time.perf_counter() - start >= args.seconds:
                break
    model.eval()
    with torch.no_grad():
        right = sum(int(model(f[None], c[None]).argmax().item() == y) for f, c, y, _ in held_out)
    print(f"{args.attention}, label {args.label}: held-out accuracy {right / len(held_out):.3f} "
          f"after {step} steps")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
