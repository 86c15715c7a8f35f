"""Extraction benchmark: tiles/s end to end (slide decode -> features in HDF5) against the model
alone on tensors already on the GPU.

1. Writes synthetic pyramidal TIFF slides (tests/slide_factory.py; 0.5 um/px, levels 1/4/16,
   256-px tiles) in parallel, JPEG-compressed as scanners write them (by imagecodecs, or by
   Pillow where imagecodecs is not installed), or zlib with ``--compression zlib``; the table
   and the JSON name which, and whether the slides were read directly (``TiffTiles``) or
   through OpenSlide.
2. Tiles them with ``longvit tile``'s ``tile_slide`` (tissue detection on; 224-px tiles at
   0.5 um/px, so tiles are read from level 0 without resizing, as for a 20x scan; with
   ``--encoder`` the preset's tile size and mpp).
3. Model only: the same ``TileEncoder``'s model path (``TileEncoder.encode``: its precision,
   compiled blocks with ``--compile``), random weights, channels_last, forward on a
   preprocessed (B, 3, 224, 224) batch already on the device, median of ``--repeats`` timed
   runs of ``--model-batches`` batches. ``--compare`` adds model-only rows for other settings
   of the same weights (e.g. ``bf16-true+compile``); ``--model-only`` stops there.
4. End to end: ``extract_features`` over all tile files (DataLoader workers decoding with
   OpenSlide, pinned memory, uint8 to the GPU, preprocessing + model + async copy back, one
   HDF5 per slide). Reported twice: "steady" counts from the first batch written to the last
   file written (start-up excluded), "wall" is the whole call (Lightning and worker start-up
   included). The first run warms the page cache and is discarded; the outputs are deleted
   between runs so nothing is skipped.

Targets (one H200 with 16 CPU cores): end to end >= 0.95 of model only (steady) and >= 0.85
(wall); the Prov-GigaPath tile encoder (``--encoder gigapath``, ViT-g, 1.1B parameters)
>= 1,100 tiles/s model only in bf16.

    PYTHONPATH=. python tools/bench_extract.py --out bench_results/extract.json     # H200
    PYTHONPATH=. python tools/bench_extract.py --encoder gigapath --compile \
        --compare bf16 bf16-true bf16-true+compile --out bench_results/gigapath.json
    PYTHONPATH=. python tools/bench_extract.py --encoder uni2-h --model-only        # any preset
    PYTHONPATH=. python tools/bench_extract.py --device cpu --smoke                 # here
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights; nothing may reach a hub
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from slide_factory import jpeg_encoder, write_slide  # noqa: E402

from longvit.extract import (  # noqa: E402
    build_preset_encoder,
    build_tile_encoder,
    extract_features,
    get_preset,
    read_features_h5,
)
from longvit.extract.job import find_tile_files, plan_extraction  # noqa: E402
from longvit.extract.lightning import tile_loader  # noqa: E402
from longvit.slides import Slide, TileSettings, tile_slide  # noqa: E402
from tools.harness import write_json  # noqa: E402


def reads_directly(slide_path: Path) -> bool:
    """Whether level 0 of this slide is read by ``TiffTiles`` (else OpenSlide composites it)."""
    with Slide(slide_path) as slide:
        slide.read_region((0, 0), 0, (64, 64))
        return slide.direct_reads and slide._tiff_tiles is not None


def _write_one(job: tuple[str, int, float, str]) -> float:
    path, size, mpp, compression = job
    start = time.perf_counter()
    write_slide(path, size, size, mpp=mpp, mpp_style="tiff", levels=(1, 4, 16),
                compression=compression)  # fmt: skip
    return time.perf_counter() - start


def _tile_one(job: tuple[str, str, TileSettings]) -> int:
    result = tile_slide(job[0], job[1], job[2])
    if result.status != "done":
        raise RuntimeError(f"tiling {job[0]} failed: {result.reason}")
    return result.tiles


def prepare(workdir: Path, args, compression: str) -> tuple[Path, int, float]:
    """Write and tile the slides (in parallel); (tile folder, tiles, seconds to write)."""
    slides, tiles = workdir / "slides", workdir / "tiles"
    slides.mkdir(parents=True, exist_ok=True)
    jobs = [(str(slides / f"slide_{i:02d}.tif"), args.slide_size, args.slide_mpp, compression)
            for i in range(args.slides)]  # fmt: skip
    settings = TileSettings(target_mpp=args.target_mpp, tile_size=args.tile_size,
                            thumbnail_size=1024)  # fmt: skip
    cpus = len(os.sched_getaffinity(0))
    start = time.perf_counter()
    with ProcessPoolExecutor(min(cpus, args.slides)) as pool:
        list(pool.map(_write_one, jobs))
        write_seconds = time.perf_counter() - start
        counts = list(pool.map(_tile_one, [(j[0], str(tiles), settings) for j in jobs]))
    return tiles, sum(counts), write_seconds


def model_only(encoder, args, device: torch.device) -> dict:
    """Images/s of the encoder's model path alone (``TileEncoder.encode``: its precision and
    compile setting) on a ready (B, 3, H, W) batch on the device."""
    encoder.to(device)
    if device.type == "cuda":
        encoder.model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    _, h, w = encoder.preprocessing.input_size
    x = torch.randn(args.batch_size, 3, h, w, device=device)
    x = x.contiguous(memory_format=torch.channels_last)

    def run(batches: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(batches):
                out = encoder.encode(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape == (args.batch_size, encoder.feature_dim)
        return batches * args.batch_size / (time.perf_counter() - start)

    start = time.perf_counter()
    run(max(2, args.model_batches // 5))  # warm-up: compilation, cuDNN autotuning, allocator
    warmup = time.perf_counter() - start
    rates = [run(args.model_batches) for _ in range(args.repeats)]
    return {"tiles_per_s": statistics.median(rates), "runs": rates, "warmup_s": warmup}


def variant(spec: str) -> tuple[str, str | None]:
    """ "bf16-true+compile" -> ("bf16-true", "inductor")."""
    precision, _, extra = spec.partition("+")
    if extra not in ("", "compile"):
        raise SystemExit(f"--compare {spec!r}: PRECISION or PRECISION+compile")
    return precision, "inductor" if extra else None


def compare_settings(base, specs, args, device) -> list[dict]:
    """Model-only rows for other precision/compile settings of the same weights."""
    rows = []
    for spec in specs:
        precision, backend = variant(spec)
        other = base.replace(precision=precision, compile=backend or "")
        rows.append({"setting": spec, **model_only(other, args, device)})
        del other
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def model_facts(encoder) -> dict:
    """Parameters, tokens per image and whether attention runs fused (timm's SDPA path)."""
    net = getattr(encoder.model, "vit", encoder.model)
    blocks = getattr(net, "blocks", None)
    attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
    patches = getattr(getattr(net, "patch_embed", None), "num_patches", None)
    return {
        "parameters": sum(p.numel() for p in encoder.model.parameters()),
        "tokens_per_image": (patches + net.num_prefix_tokens) if patches else None,
        "fused_attention": getattr(attn, "fused_attn", None),
    }


def loader_only(encoder, tiles: Path, workdir: Path, args, workers: int) -> dict:
    """Tiles/s of the extractor's DataLoader alone (workers decode and collate, the batch is
    copied to the device; no model), counted from the first batch to the last: the ceiling the
    CPU side sets."""
    device = torch.device(args.device)
    jobs, _ = plan_extraction(find_tile_files([tiles]), workdir / "none", encoder.identity())
    rates = []
    for _ in range(args.repeats):
        loader = tile_loader(jobs, args.batch_size, workers, device.type == "cuda")
        start, count = None, 0
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True)
            if start is None:
                start = time.perf_counter()
            else:
                count += len(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(count / (time.perf_counter() - start) if count else 0.0)
    return {"tiles_per_s": statistics.median(rates), "runs": rates}


def end_to_end(encoder, tiles: Path, workdir: Path, args, n_tiles: int, workers: int) -> dict:
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    steady, wall = [], []
    for attempt in range(args.repeats + 1):  # the first run warms the page cache
        out = workdir / "features"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        run = extract_features(tiles, out, encoder, batch_size=args.batch_size,
                               workers=workers, accelerator=accelerator,
                               progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        if run.failed or sum(r.tiles for r in run.results) != n_tiles:
            raise RuntimeError(f"extraction incomplete: {run.results}")
        if attempt:
            steady.append(run.steady_tiles_per_second)
            wall.append(n_tiles / seconds)
    rows = sum(len(read_features_h5(p)) for p in (workdir / "features").glob("*.h5"))
    assert rows == n_tiles, (rows, n_tiles)
    return {
        "steady_tiles_per_s": statistics.median(steady),
        "wall_tiles_per_s": statistics.median(wall),
        "steady_runs": steady,
        "wall_runs": wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--encoder", default=None, help="a preset (random weights), e.g. gigapath")
    p.add_argument("--model-kwargs", type=json.loads, default=None)
    p.add_argument("--precision", default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's blocks")
    p.add_argument(
        "--compare", nargs="+", default=[], metavar="SETTING",
        help="model-only rows for other settings: bf16, bf16-true, fp16, fp32, +compile",
    )  # fmt: skip
    p.add_argument("--model-only", action="store_true", help="no slides, no end to end")
    p.add_argument("--tile-size", type=int, default=None, help="target pixels (default: 224, "
                   "or the preset's)")  # fmt: skip
    p.add_argument("--target-mpp", type=float, default=None, help="default: 0.5 or the preset's")
    p.add_argument("--slide-mpp", type=float, default=0.5, help="level-0 mpp of the slides")
    p.add_argument("--slides", type=int, default=16)
    p.add_argument("--slide-size", type=int, default=24000, help="level-0 pixels per side")
    p.add_argument("--compression", default="jpeg", choices=["jpeg", "zlib"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--workers", type=int, nargs="+", default=None,
        help="DataLoader workers; several values: one row each (default: CPUs - 1)",
    )  # fmt: skip
    p.add_argument("--model-batches", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU check of the script)")
    args = p.parse_args(argv)
    preset = get_preset(args.encoder) if args.encoder else None
    args.tile_size = args.tile_size or (preset.tile_size if preset else 224)
    args.target_mpp = args.target_mpp or (preset.mpp if preset else 0.5)
    if args.smoke:
        if preset:  # the preset's family at a tiny size, its own 224-px input
            args.model_kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2}
        else:
            args.model, args.model_kwargs = "vit_tiny_patch16_224", {"img_size": 64}
            args.tile_size = 64
        args.slides, args.slide_size = 2, 1024
        args.batch_size, args.model_batches, args.repeats = 16, 3, 1
        args.workers = [1] if args.workers is None else args.workers
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu")
    cpus = len(os.sched_getaffinity(0))
    args.workers = [cpus - 1] if args.workers is None else args.workers
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    compression = args.compression
    compressed_by = jpeg_encoder() if compression == "jpeg" else "zlib (stdlib)"
    device = torch.device(args.device)
    backend = "inductor" if args.compile else None
    settings = dict(random_init=True, precision=precision, model_kwargs=args.model_kwargs,
                    compile=backend)  # fmt: skip
    with torch.device(device):  # random weights initialised where they run: seconds, not minutes
        if preset:
            encoder = build_preset_encoder(preset.name, **settings)
        else:
            encoder = build_tile_encoder(args.model, **settings)
    name = preset.name if preset else args.model
    setting = precision + ("+compile" if args.compile else "")
    alone = model_only(encoder, args, device)
    compared = compare_settings(encoder, args.compare, args, device)
    facts = model_facts(encoder)
    print(f"\n{name} ({facts['parameters'] / 1e6:,.1f}M parameters, "
          f"{facts['tokens_per_image']} tokens per image, fused attention: "
          f"{facts['fused_attention']}), batch {args.batch_size}, model only on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}:")  # fmt: skip
    print("| setting | tiles/s | vs first | warm-up s |")
    print("|---|---|---|---|")
    for row in [{"setting": setting, **alone}, *compared]:
        rate = row["tiles_per_s"]
        print(f"| {row['setting']} | {rate:,.0f} | {rate / alone['tiles_per_s']:.2f} | "
              f"{row['warmup_s']:.1f} |")  # fmt: skip
    if args.model_only:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"model": name, "setting": setting, **facts,
                                            "model_only": alone, "compared": compared,
                                            "batch_size": args.batch_size}, indent=2))  # fmt: skip
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        tiles, n_tiles, write_seconds = prepare(workdir, args, compression)
        direct = reads_directly(workdir / "slides" / "slide_00.tif")
        rows = []
        for workers in args.workers:
            loader = loader_only(encoder, tiles, workdir, args, workers)
            e2e = end_to_end(encoder, tiles, workdir, args, n_tiles, workers)
            rows.append({"workers": workers, "loader_only": loader, "end_to_end": e2e})
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    model_rate = alone["tiles_per_s"]
    for row in rows:
        row["steady_over_model_only"] = row["end_to_end"]["steady_tiles_per_s"] / model_rate
        row["wall_over_model_only"] = row["end_to_end"]["wall_tiles_per_s"] / model_rate
    best = max(rows, key=lambda r: r["steady_over_model_only"])
    shm = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").exists() else 0
    result = {
        "model": name,
        "precision": precision,
        "compile": backend,
        **facts,
        "compared": compared,
        "preprocessing": encoder.preprocessing.attributes(),
        "tile_size": args.tile_size,
        "target_mpp": args.target_mpp,
        "slide_mpp": args.slide_mpp,
        "slides": args.slides,
        "slide_size": args.slide_size,
        "compression": compression,
        "compressed_by": compressed_by,
        "direct_tiff_reads": direct,
        "tiles": n_tiles,
        "slide_write_seconds": round(write_seconds, 1),
        "batch_size": args.batch_size,
        "model_only": alone,
        "by_workers": rows,
        "best_workers": best["workers"],
        "steady_over_model_only": best["steady_over_model_only"],
        "wall_over_model_only": best["wall_over_model_only"],
        "target": ">= 0.95 steady and >= 0.85 wall (end to end / model only); gigapath "
        ">= 1,100 tiles/s model only",
        "machine": {
            "device": torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.processor() or platform.machine(),
            "cpus": cpus,
            "dev_shm_bytes": shm,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    how = "read directly" if direct else "read through OpenSlide"
    print(f"\n{name}, {setting}, {args.tile_size}-px tiles ({compression} slides, {how}), "
          f"batch {args.batch_size}, {n_tiles:,} tiles on {result['machine']['device']} "
          f"({cpus} CPUs); model only (on-device tensors): {model_rate:,.0f} tiles/s")  # fmt: skip
    print("| workers | loader only (no model) | end to end, steady | end to end, wall |")
    print("|---|---|---|---|")
    for row in rows:
        loader, e2e = row["loader_only"]["tiles_per_s"], row["end_to_end"]
        print(f"| {row['workers']} | {loader:,.0f} ({loader / model_rate:.2f}) | "
              f"{e2e['steady_tiles_per_s']:,.0f} ({row['steady_over_model_only']:.2f}) | "
              f"{e2e['wall_tiles_per_s']:,.0f} ({row['wall_over_model_only']:.2f}) |")  # fmt: skip
    print("(in brackets: over model only; targets: steady >= 0.95, wall >= 0.85)")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
