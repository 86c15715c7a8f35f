"""``longvit generate``: reports / captions from slide feature files with a trained captioner.

    longvit generate --checkpoint run/last.ckpt --features a.h5 b.h5 --out reports.jsonl
    longvit generate --checkpoint run/last.ckpt --manifest data.csv --split test

Writes one JSON line per slide: {"features": path, "text": generated text}
(plus "reference" when the manifest has a text column), to --out or stdout.
Slides are generated --batch-size at a time in one batched call (tiles padded and masked;
prompts of different lengths, from --prompt-column, right-padded: each slide continues
after its own prompt).
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longvit generate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="Lightning checkpoint of the captioner (read with weights_only=True)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", nargs="+", help="HDF5 feature files (features, coords)")
    src.add_argument("--manifest", help="manifest CSV (see longvit.training.text_data)")
    p.add_argument("--split", default=None, help="manifest split to use (default: all rows)")
    p.add_argument("--feature-column", default="features")
    p.add_argument("--text-column", default="text")
    p.add_argument("--split-column", default="split")
    p.add_argument(
        "--tile-size-level0",
        type=float,
        default=None,
        help="tile size in level-0 pixels for files without patch_size_level0",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--prompt", default="", help="text the report starts with")
    p.add_argument(
        "--prompt-column",
        default=None,
        help="manifest column with each slide's own prompt (instead of --prompt)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="slides per generation call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--out", default=None, help="JSON lines file (default: stdout)")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from longvit.training.captioning import load_captioner
    from longvit.training.text_data import (
        SlideTextDataset,
        collate_slide_text,
        read_manifest,
    )

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        module = load_captioner(args.checkpoint, map_location=device)
    except (ValueError, RuntimeError) as err:  # WeightsFileError; a tokenizer this install lacks
        print(f"longvit generate: {err}", file=sys.stderr)
        return 2
    if args.manifest:
        rows = read_manifest(
            args.manifest, args.split, args.feature_column, args.text_column, args.split_column
        )
    else:
        rows = [{args.feature_column: path} for path in args.features]
    if args.batch_size < 1:
        print(f"longvit generate: --batch-size must be >= 1, got {args.batch_size}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.prompt_column and not args.manifest:
        print("longvit generate: --prompt-column needs --manifest", file=sys.stderr)
        return 2
    if args.prompt_column and rows and args.prompt_column not in rows[0]:
        print(f"longvit generate: the manifest has no column {args.prompt_column!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    dataset = SlideTextDataset(
        rows, module.tokenizer, args.feature_column, args.text_column,
        tile_size_level0=args.tile_size_level0,
    )  # fmt: skip
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115
    try:
        for lo in range(0, len(dataset), args.batch_size):
            index = range(lo, min(lo + args.batch_size, len(dataset)))
            items = [dataset[i] for i in index]
            batch = collate_slide_text(
                [{k: v for k, v in it.items() if k != "tokens"} for it in items],
                module.tokenizer.pad_id,
            )
            prompts = (
                [rows[i][args.prompt_column] for i in index]
                if args.prompt_column
                else (args.prompt)
            )
            mask = batch["padding_mask"] if bool(batch["padding_mask"].any()) else None
            texts = module.generate_text(
                batch["features"].to(device), batch["coords"].to(device),
                None if mask is None else mask.to(device),
                max_new_tokens=args.max_new_tokens, prompt=prompts,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                generator=generator,
            )  # fmt: skip
            for item, text in zip(items, texts):
                record = {"features": item["path"], "text": text}
                if "text" in item:
                    record["reference"] = item["text"]
                out.write(json.dumps(record) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
