"""``longvit lm-eval``: perplexity of a language-model checkpoint at several contexts.

    longvit lm-eval runs/lm/last.ckpt --contexts 2048 8192 32768
    longvit lm-eval runs/lm/last.ckpt --root /other/code --max-tokens 4194304 --json ppl.json

The held-out files are those of the checkpoint's training run (its saved ``CodeCorpus``
arguments: root, pattern, test_fraction, max_file_bytes), unless given here. The checkpoint is
read with weights_only=True (``longvit.weights_file``). Prints one Markdown row per context
(``longvit.training.perplexity``: every context scores the same tokens).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

DEFAULT_CONTEXTS = (2048, 8192, 32768)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longvit lm-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="Lightning checkpoint of a CausalLM (weights_only=True)")
    p.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=list(DEFAULT_CONTEXTS),
        help="evaluation contexts in tokens (default: 2048 8192 32768)",
    )
    p.add_argument("--root", default=None, help="corpus folder or glob (default: the run's)")
    p.add_argument("--pattern", default=None, help="files under a folder root (default: the run's)")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="held-out fraction of files (default: the run's)",
    )
    p.add_argument("--max-file-bytes", type=int, default=None)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=1 << 20,
        help="held-out tokens read (the scored ones: a multiple of the largest context)",
    )
    p.add_argument("--batch-tokens", type=int, default=1 << 16, help="tokens per forward pass")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p  # fmt: skip


def corpus_arguments(args: argparse.Namespace, checkpoint: dict) -> dict:
    """root / pattern / test_fraction / max_file_bytes: the command's, else the run's."""
    from longvit.training.corpus_data import CodeCorpus

    saved = checkpoint.get("datamodule_hyper_parameters")
    saved = saved if isinstance(saved, dict) else {}
    params = inspect.signature(CodeCorpus.__init__).parameters
    defaults = {k: v.default for k, v in params.items() if v.default is not inspect.Parameter.empty}
    out = {}
    for key in ("root", "pattern", "test_fraction", "max_file_bytes"):
        given = getattr(args, key)
        out[key] = given if given is not None else saved.get(key, defaults.get(key))
    if out["root"] is None:
        raise ValueError(
            f"{args.checkpoint}: names no corpus (no saved CodeCorpus arguments): pass --root"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from longvit.training.causal_lm import load_causal_lm
    from longvit.training.code_corpus import heldout_tokens, list_corpus_files, split_files
    from longvit.training.perplexity import context_perplexity, format_rows

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        module, ckpt = load_causal_lm(args.checkpoint, map_location=device)
        corpus = corpus_arguments(args, ckpt)
        files = list_corpus_files(corpus["root"], corpus["pattern"], corpus["max_file_bytes"])
        _, test = split_files(files, corpus["test_fraction"])
        tokens = heldout_tokens(test.paths, module.tokenizer, args.max_tokens + 1)
        rows = context_perplexity(module, tokens, args.contexts, args.batch_tokens, device)
    except (ValueError, RuntimeError) as err:  # WeightsFileError, CorpusError, tokenizer
        print(f"longvit lm-eval: {err}", file=sys.stderr)
        return 2
    total, body = module.parameter_counts()
    title = (
        f"{args.checkpoint}: {module.hparams.decoder} "
        f"({module.attention} attention, {total / 1e6:.2f}M parameters, "
        f"{body / 1e6:.2f}M without embeddings), {module.tokens_seen:,} tokens trained, "
        f"{len(test)} held-out files of {corpus['root']}"
    )
    print(format_rows(rows, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "rows": rows}, f, indent=2)
    return 0
