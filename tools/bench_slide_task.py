"""A slide-level task that needs long-range attention: longvit_slide_base, full vs local-only.

Writes a synthetic feature cohort (``longvit.demo.feature_cohort``, task "pair"): every slide
has thousands of tiles (default 2,000-4,000) of Gaussian-noise features and two marker regions
far apart (runs of consecutive tiles, one in the first quarter of the tile order, one in the
last), each of one of 4 types, always different; the label is 1 when the two types are
partners (0-1 or 2-3), which no single region decides, nor any threshold on a sum of one term
per region (a nonlinear function of the whole slide's mean feature does). Then it trains, with
the same data, seed and schedule,

- ``full``: longvit_slide_base with dilation rates 1 2, segments 256 + the whole slide and one
  register token (the regime that learned on the proxy and on the H200; ``--rates 1 2 4 8 16
  --segments auto --registers 0`` gives the registered LongViT schedule, which did not), and
- ``local``: the same model restricted to its first branch (one segment length w_0 of the
  auto schedule at the median slide length, dilation 1): tiles attend only within their
  w_0-tile segment, so the two markers never meet in one attention,

both pooled by a class token (``--pool token``, the default) and prints the held-out AUROC of
each (JSON with --out). The local model cannot decide the label: its class token sits in the
first w_0-tile segment and no layer ever mixes segments, so it sees at most the first region,
whose type is independent of the label. (With ``--pool avg`` the head is linear on the mean
of the final per-token norm's outputs, fc_norm off, so a local model's logit is a sum of one
term per region, and no such sum separates partner pairs, though one comes close enough to
matter: "both types in {0, 1}" is right on 3 of 4 slides, and the best such sum ranks them
with AUROC ~0.62 (a search over integer scores per type), so avg pooling is only partly blind,
class-token pooling wholly; mean pooling followed by a
LayerNorm, the models' usual head, would not be blind: the norm of the pooled vector can carry
the product of the two regions' terms, and a CPU proxy's local model used it.)

The features are scaled (``--scale``): the slide encoder adds a sin-cos position embedding of
norm sqrt(C / 2) to features projected by a std-0.02 linear layer, so unit-variance features
are a small part of each token at initialisation, and on the CPU proxy
(``tools/slide_task_proxy.py``) a dense model then did not start learning within several
hundred steps; scaled so that the projected features outweigh the positions, it did within
~100. Training runs a fixed number of optimizer steps (``--steps``, warmup + cosine), the
Trainer's max_time only a safety net; the cohort is large (1,500 slides) so that 1,500 steps of
4 slides are ~6 epochs: on the proxy, 140 training slides were memorised (training loss down,
held-out loss up) before the dilated model found the rule. On that proxy (4 blocks, dim 64)
the dilated model did not learn the task within ~700 steps where a dense one learned it in
~100: ``--models full local dense`` adds that dense model as a control. What did learn there
(one seed, ~136 steps): rates 1 2 with segments 64 + the whole slide and one register token
after the class token (``--rates 1 2 --segments 256 0 --registers 1`` here): each leading token
takes part in the whole-slide branch for one head-group offset, and the register covers the
other; the local model stays blind with it (positions 0-1 lie in its first segment).

    PYTHONPATH=. python tools/bench_slide_task.py --out bench_slide_task.json   # one H200, ~5 min
    PYTHONPATH=. python tools/bench_slide_task.py --rates 1 2 4 8 16 --segments auto \
        --registers 0 --models full                    # the registered schedule (did not learn)
    PYTHONPATH=. python tools/bench_slide_task.py --device cpu --small          # smoke test

Measured on one H200 (docs/benchmarks.md, 2026-11-29): held-out AUROC full 0.940 and 0.948 (two
seeds), local 0.534.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import lightning.pytorch as pl
import torch

from longvit.attention.schedule import segment_schedule
from longvit.demo.feature_cohort import make_feature_cohort
from longvit.training import FeatureDataModule, SlideClassifier


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny cohort and model (smoke test)")
    p.add_argument("--slides", type=int, default=1000)
    p.add_argument("--min-tiles", type=int, default=2000)
    p.add_argument("--max-tiles", type=int, default=4000)
    p.add_argument("--dim", type=int, default=32, help="tile feature width")
    p.add_argument("--signal", type=float, default=4.0, help="marker strength (noise std 1)")
    p.add_argument(
        "--region", type=float, nargs=2, default=(0.1, 0.15),
        help="size range of each marker region, as a fraction of the slide's tiles",
    )  # fmt: skip
    p.add_argument(
        "--scale", type=float, default=10.0,
        help="feature scale (noise std and signal alike); scale * sqrt(dim) sets how much the "
        "projected features outweigh the position embedding at initialisation",
    )  # fmt: skip
    p.add_argument("--pool", default="token", choices=["token", "avg"])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per model")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument(
        "--minutes-per-model", type=float, default=4.0, help="Trainer max_time (safety net)"
    )
    p.add_argument(
        "--models", nargs="+", default=["full", "local"], choices=["full", "local", "dense"],
        help="which to train, in order (dense: one branch over the whole slide, a control)",
    )  # fmt: skip
    p.add_argument(
        "--rates", type=int, nargs="+", default=[1, 2],
        help="dilation rates of the full model (default 1 2: with --segments 256 0 and one "
        "register, the regime that learned; the registered ones: --rates 1 2 4 8 16 "
        "--segments auto)",
    )  # fmt: skip
    p.add_argument(
        "--segments", nargs="+", default=["256", "0"],
        help="segment lengths of the full model, one per rate (0: the longest slide + the "
        "prefix tokens; 'auto': the auto schedule of each slide's length)",
    )  # fmt: skip
    p.add_argument(
        "--registers", type=int, default=1,
        help="register tokens after the class token, every model (reg_tokens; see the docstring)",
    )  # fmt: skip
    p.add_argument("--workdir", default=None, help="cohort folder (default: a temporary one)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    return p


def median_tiles(manifest: Path) -> int:
    lengths = []
    for path in sorted((manifest.parent / "features").glob("*.h5")):
        with h5py.File(path, "r") as f:
            lengths.append(f["features"].shape[0])
    return int(statistics.median(lengths))


def train_one(name: str, manifest: Path, model_kwargs: dict, args) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    data = FeatureDataModule(
        manifest, batch_size=args.batch_size, max_tokens=None, num_workers=2, seed=args.seed
    )
    model = SlideClassifier(
        num_classes=2,
        model_name="longvit_slide_small" if args.small else "longvit_slide_base",
        model_kwargs=model_kwargs,
        lr=args.lr,
        weight_decay=0.05,
        warmup_fraction=args.warmup_fraction,
        importance="none",
    )
    cuda = args.device == "cuda"
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=args.steps,
        max_epochs=-1,
        max_time={"minutes": args.minutes_per_model},
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    fit_s = time.perf_counter() - start
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test = trainer.test(model, data, verbose=False)[0]
    result = {
        "model": name,
        "test_auroc": test["test/auroc"],
        "test_bal_acc": test["test/bal_acc"],
        "last_val": val,
        "epochs_done": trainer.current_epoch,
        "steps_done": trainer.global_step,
        "fit_seconds": round(fit_s, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "model_kwargs": model_kwargs,
    }
    print(json.dumps(result), flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.segments != ["auto"] and not all(w.isdigit() for w in args.segments):
        parser.error(f"--segments takes whole numbers (0: the whole slide) or 'auto', got "
                     f"{' '.join(args.segments)}")  # fmt: skip
    if args.segments != ["auto"] and len(args.segments) != len(args.rates):
        parser.error(f"--segments needs one length per rate ({len(args.rates)}), got "
                     f"{len(args.segments)}")  # fmt: skip
    if args.small:
        args.slides, args.min_tiles, args.max_tiles, args.dim = 24, 200, 400, 32
        args.steps, args.batch_size, args.lr, args.scale = 10, 4, 1e-3, 10.0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --small for the smoke test", file=sys.stderr)
        return 2
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="slide_task_")
    workdir = Path(args.workdir or tmp.name)
    start = time.perf_counter()
    manifest = make_feature_cohort(
        workdir, n_slides=args.slides, tiles=(args.min_tiles, args.max_tiles), dim=args.dim,
        task="pair", n_types=4, signal=args.signal, region=tuple(args.region),
        scale=args.scale, splits=(0.7, 0.1, 0.2), seed=args.seed,
    )  # fmt: skip
    n_median = median_tiles(manifest)
    local_segment = segment_schedule(n_median)[0]
    print(
        f"cohort: {args.slides} slides, {args.min_tiles}-{args.max_tiles} tiles (median "
        f"{n_median}), written in {time.perf_counter() - start:.0f} s; local branch w_0 = "
        f"{local_segment}",
        flush=True,
    )
    if args.pool == "token":
        common = dict(in_chans=args.dim, class_token=True, global_pool="token")
    else:  # per-token norm, mean, linear head: a sum of per-token terms
        common = dict(in_chans=args.dim, class_token=False, global_pool="avg", fc_norm=False)
    if args.small:
        common.update(embed_dim=64, depth=2, num_heads=4)
    if args.registers:
        common["reg_tokens"] = args.registers
    whole = args.max_tiles + 1 + args.registers  # a segment over the longest slide + prefix
    full_schedule = {}
    full_schedule["dilation_rates"] = args.rates
    if args.segments != ["auto"]:
        full_schedule["segment_lengths"] = [int(w) or whole for w in args.segments]
    kwargs = {
        "full": dict(common, **full_schedule),
        "local": dict(common, segment_lengths=[local_segment], dilation_rates=[1]),
        # one branch over the longest slide (+ the class token): every tile sees every tile
        "dense": dict(common, segment_lengths=[whole], dilation_rates=[1]),
    }
    results = [train_one(name, manifest, kwargs[name], args) for name in args.models]
    summary = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "slides": args.slides,
        "tiles": [args.min_tiles, args.max_tiles],
        "args": vars(args),
        "median_tiles": n_median,
        "local_segment": local_segment,
        "results": results,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    aurocs = ", ".join(f"{r['model']} {r['test_auroc']:.3f}" for r in results)
    print(f"held-out AUROC: {aurocs} ({summary['total_seconds']:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
