"""LongNet's language-model table, small: perplexity against evaluation context on code.

LongNet (Ding et al. 2023, Table 2) trains on The Stack and reports test perplexity at
evaluation contexts 2K / 8K / 32K:

    Transformer (dense), trained at 2K    4.24 / 5.07 / 11.29
    Sparse Transformer, trained at 32K    5.15 / 4.00 / 3.64
    LongNet, trained at 32K               4.37 / 3.33 / 3.01

This script trains, on one GPU and the same tokens, a small LongNet decoder at
``--longnet-context`` (32K: LongNet's schedule, segments 2048..32768, rates 1, 2, 4, 6, 12;
a shorter context scales every segment by context / 32768 and keeps the rates) and the same
decoder with dense causal attention at ``--dense-context`` (2K), then scores both on held-out
files at ``--contexts`` (``longvit.training.perplexity``: every context the same tokens).
The sparse Transformer row is not reproduced. The corpus defaults to the Python sources of
this environment's installed packages (``sysconfig.get_paths()["purelib"]``), split by file.

The token budget is fixed on the first call: ``--train-tokens``, or what the LongNet model
trains on in ``--train-minutes`` at the speed measured then (a few steps on random tokens).
Both models take the same optimizer steps of the same tokens per step. Everything lives in
``--run-dir`` (plan.json, a checkpoint and a result per model): a call trains and evaluates
until ``--max-minutes`` and stops with a checkpoint; the next call resumes, so the run can
span several calls. It prints the table once both models are evaluated.

    PYTHONPATH=. python tools/bench_lm_table.py --run-dir runs/lm_table --max-minutes 9
    PYTHONPATH=. python tools/bench_lm_table.py --smoke --run-dir /tmp/lm_smoke   # CPU, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sysconfig
import time
from pathlib import Path

import torch

PAPER = {
    "dense": (4.24, 5.07, 11.29),
    "sparse": (5.15, 4.00, 3.64),
    "longnet": (4.37, 3.33, 3.01),
}
PAPER_CONTEXTS = (2048, 8192, 32768)
LONGNET_SEGMENTS = (2048, 4096, 8192, 16384, 32768)
LONGNET_RATES = (1, 2, 4, 6, 12)
MODELS = ("longnet", "dense")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/lm_table")
    p.add_argument("--corpus", default=None, help="folder or glob (default: site-packages)")
    p.add_argument("--pattern", default="**/*.py")
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--tokenizer", default="auto", help="auto | cl100k_base | byte")
    p.add_argument("--longnet-context", type=int, default=32768)
    p.add_argument("--dense-context", type=int, default=2048)
    p.add_argument("--contexts", type=int, nargs="+", default=list(PAPER_CONTEXTS))
    p.add_argument("--embed-dim", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--step-tokens", type=int, default=1 << 17, help="tokens per optimizer step")
    p.add_argument("--micro-tokens", type=int, default=1 << 17, help="tokens per forward pass")
    p.add_argument("--train-tokens", type=int, default=None, help="token budget per model")
    p.add_argument(
        "--train-minutes",
        type=float,
        default=8.0,
        help="without --train-tokens: the budget the LongNet model trains on in this "
        "time (measured on the first call)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--eval-tokens", type=int, default=1 << 21, help="held-out tokens read")
    p.add_argument("--max-minutes", type=float, default=9.0, help="this call's time")
    p.add_argument("--save-minutes", type=float, default=2.0, help="checkpoint interval")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny CPU run: bytes, 2 x 64 model, contexts 64 / 256, this repository's "
        "longvit/ sources, 120K tokens",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.corpus = args.corpus or str(Path(__file__).resolve().parents[1] / "longvit")
        args.tokenizer, args.test_fraction = "byte", 0.15
        args.longnet_context, args.dense_context, args.contexts = 256, 64, [64, 256]
        args.embed_dim, args.depth, args.heads = 64, 2, 4
        args.step_tokens = args.micro_tokens = 2048
        args.train_tokens = args.train_tokens or 120_000
        args.eval_tokens, args.lr = 1 << 16, 3e-3
    return args


def longnet_schedule(context: int) -> tuple[list[int], list[int], str]:
    """LongNet's LM schedule scaled to context: (segment lengths, rates, how)."""
    if context == LONGNET_SEGMENTS[-1]:
        return list(LONGNET_SEGMENTS), list(LONGNET_RATES), "LongNet's schedule"
    scale = context / LONGNET_SEGMENTS[-1]
    segments = [max(1, round(w * scale)) for w in LONGNET_SEGMENTS]
    how = f"LongNet's schedule x {context}/{LONGNET_SEGMENTS[-1]} (segments), same rates"
    return segments, list(LONGNET_RATES), how


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} x {os.cpu_count()}, torch {torch.__version__}"


# ------------------------------------------------------------------ plan
def model_spec(plan: dict, name: str) -> dict:
    """CausalLM and CodeCorpus arguments of one model of the plan."""
    context = plan["longnet_context"] if name == "longnet" else plan["dense_context"]
    kwargs = dict(embed_dim=plan["embed_dim"], depth=plan["depth"], num_heads=plan["heads"],
                  pos_embed="xpos")  # fmt: skip
    if name == "longnet":
        kwargs.update(segment_lengths=plan["segments"], dilation_rates=plan["rates"])
    else:
        kwargs.update(attention="dense", segment_lengths=[context], dilation_rates=[1])
    per_step = plan["step_tokens"] // context
    micro = max(1, min(per_step, plan["micro_tokens"] // context))
    if per_step % micro:
        raise SystemExit(
            f"--step-tokens / context ({per_step}) must be a multiple of the micro batch ({micro})"
        )
    return dict(context=context, decoder_kwargs=kwargs, batch_size=micro,
                accumulate=per_step // micro)  # fmt: skip


def make_module(plan: dict, name: str):
    from longvit.training import CausalLM

    spec = model_spec(plan, name)
    return CausalLM(
        decoder="longnet_decoder_small", decoder_kwargs=spec["decoder_kwargs"],
        tokenizer=plan["tokenizer"], lr=plan["lr"], weight_decay=0.1, betas=(0.9, 0.98),
        warmup_steps=max(1, round(plan["warmup_fraction"] * plan["steps"])), min_lr_ratio=0.1,
    )  # fmt: skip


def measure_tokens_per_second(plan: dict, device: str) -> float:
    """LongNet's training speed: a few optimizer steps on random tokens (after 2 warm-up)."""
    module = make_module(dict(plan, steps=100), "longnet").to(device)
    spec = model_spec(plan, "longnet")
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    vocab = module.tokenizer.vocab_size
    batch = torch.randint(0, vocab, (spec["batch_size"], spec["context"] + 1), device=device)
    autocast = torch.autocast(device, torch.bfloat16, enabled=device == "cuda")
    times = []
    for _ in range(2 + 3):
        began = time.perf_counter()
        for _ in range(spec["accumulate"]):
            with autocast:
                loss = module.window_loss(batch)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    del module, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return plan["step_tokens"] / (sum(times[2:]) / len(times[2:]))


def load_or_make_plan(args, run_dir: Path, device: str) -> dict:
    path = run_dir / "plan.json"
    if path.exists():
        plan = json.loads(path.read_text())
        print(f"resuming the run in {run_dir} (its plan.json fixes the settings)")
        return plan
    from longvit.models.tokenizer import get_tokenizer

    segments, rates, how = longnet_schedule(args.longnet_context)
    plan = dict(
        corpus=args.corpus or sysconfig.get_paths()["purelib"], pattern=args.pattern,
        test_fraction=args.test_fraction, tokenizer=get_tokenizer(args.tokenizer).name,
        longnet_context=args.longnet_context, dense_context=args.dense_context,
        contexts=args.contexts, segments=segments, rates=rates, schedule=how,
        embed_dim=args.embed_dim, depth=args.depth, heads=args.heads,
        step_tokens=args.step_tokens, micro_tokens=args.micro_tokens, lr=args.lr,
        warmup_fraction=args.warmup_fraction, eval_tokens=args.eval_tokens, machine=machine(),
    )  # fmt: skip
    for name in MODELS:
        model_spec(plan, name)  # checks the batch arithmetic
    if args.train_tokens:
        budget, how_budget = args.train_tokens, "--train-tokens"
    else:
        rate = measure_tokens_per_second(plan, device)
        budget = int(rate * args.train_minutes * 60)
        how_budget = f"{args.train_minutes} min at the LongNet model's {rate:,.0f} tokens/s"
    plan["steps"] = max(1, budget // plan["step_tokens"])
    plan["train_tokens"] = plan["steps"] * plan["step_tokens"]
    plan["budget"] = how_budget
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2))
    return plan


# --------------------------------------------------------------- training
def train(plan: dict, name: str, run_dir: Path, deadline: float, args, device: str) -> bool:
    """Train (or go on training) one model until its steps or the deadline; True when done."""
    import lightning.pytorch as pl

    from longvit.training import CodeCorpus

    out = run_dir / name
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.ckpt"
    progress_path = out / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {"seconds": 0.0}
    spec = model_spec(plan, name)
    module = make_module(plan, name)
    workers = args.num_workers if args.num_workers is not None else min(8, os.cpu_count() or 1)
    data = CodeCorpus(
        plan["corpus"], plan["pattern"], context=spec["context"], batch_size=spec["batch_size"],
        tokenizer=plan["tokenizer"], test_fraction=plan["test_fraction"], num_workers=workers,
    )  # fmt: skip

    def save(trainer) -> None:
        tmp = out / "last.ckpt.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # with the optimizer: resumable
        os.replace(tmp, last)

    class Deadline(pl.Callback):
        """After an optimizer step: a checkpoint every --save-minutes; stop at the deadline."""

        saved_at, step = time.time(), -1

        def on_train_batch_end(self, trainer, *_):
            if trainer.global_step == self.step:  # inside an accumulation: not a step boundary
                return
            self.step = trainer.global_step
            now = time.time()
            if now > deadline:
                trainer.should_stop = True
            elif now - self.saved_at > args.save_minutes * 60:
                save(trainer)
                self.saved_at = now

    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if device == "cuda" else "32-true",
        max_steps=plan["steps"], accumulate_grad_batches=spec["accumulate"],
        gradient_clip_val=1.0, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Deadline()],
        num_sanity_val_steps=0,
    )  # fmt: skip
    began = time.time()
    trainer.fit(module, data, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    progress["seconds"] += time.time() - began
    save(trainer)
    progress.update(step=trainer.global_step, tokens=module.tokens_seen)
    progress_path.write_text(json.dumps(progress, indent=2))
    print(f"{name}: step {trainer.global_step} / {plan['steps']}, {module.tokens_seen:,} tokens, "
          f"{progress['seconds'] / 60:.1f} min of training so far")  # fmt: skip
    return trainer.global_step >= plan["steps"]


def evaluate(plan: dict, name: str, run_dir: Path, device: str) -> dict:
    from longvit.training.causal_lm import load_causal_lm
    from longvit.training.code_corpus import heldout_tokens, list_corpus_files, split_files
    from longvit.training.perplexity import context_perplexity

    module, _ = load_causal_lm(str(run_dir / name / "last.ckpt"), map_location=device)
    files = list_corpus_files(plan["corpus"], plan["pattern"])
    train_files, test = split_files(files, plan["test_fraction"])
    tokens = heldout_tokens(test.paths, module.tokenizer, plan["eval_tokens"] + 1)
    rows = context_perplexity(module, tokens, plan["contexts"], device=device)
    total, body = module.parameter_counts()
    progress = json.loads((run_dir / name / "progress.json").read_text())
    result = dict(model=name, rows=rows, parameters=total, body_parameters=body,
                  tokens_seen=module.tokens_seen, train_seconds=progress["seconds"],
                  train_files=len(train_files), test_files=len(test))  # fmt: skip
    (run_dir / name / "result.json").write_text(json.dumps(result, indent=2))
    return result


def print_table(plan: dict, results: dict) -> None:
    contexts = plan["contexts"]
    head = " | ".join(f"ppl @ {c:,}" for c in contexts)
    print(f"\n## LongNet's LM table, small ({plan['machine']})\n")
    print(f"corpus {plan['corpus']} ({plan['pattern']}), {results['longnet']['train_files']} "
          f"training / {results['longnet']['test_files']} held-out files, tokenizer "
          f"{plan['tokenizer']}; {plan['train_tokens']:,} tokens per model ({plan['budget']}), "
          f"{plan['step_tokens']:,} per step; {results['longnet']['rows'][0]['tokens']:,} "
          f"held-out tokens scored at every context\n")  # fmt: skip
    print(f"| model | trained at | parameters (without embedding) | tokens seen | train time "
          f"| {head} |")  # fmt: skip
    print("|---|---:|---:|---:|---:|" + "---:|" * len(contexts))
    for name in MODELS:
        r = results[name]
        ctx = plan["longnet_context"] if name == "longnet" else plan["dense_context"]
        label = (
            f"LongNet ({plan['schedule']}: {plan['segments']}, {plan['rates']})"
            if name == "longnet"
            else "dense (causal SDPA)"
        )
        ppl = " | ".join(f"{row['ppl']:.3f}" for row in r["rows"])
        size = f"{r['parameters'] / 1e6:.2f}M ({r['body_parameters'] / 1e6:.2f}M)"
        print(f"| {label} | {ctx:,} | {size} | {r['tokens_seen']:,} | "
              f"{r['train_seconds'] / 60:.1f} min | {ppl} |")  # fmt: skip
    if list(contexts) == list(PAPER_CONTEXTS):
        print("\nLongNet's paper (The Stack, 12 x 768): dense at 2K "
              f"{PAPER['dense']}, sparse at 32K {PAPER['sparse']}, "
              f"LongNet at 32K {PAPER['longnet']}")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    deadline = started + args.max_minutes * 60
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_dir = Path(args.run_dir)
    plan = load_or_make_plan(args, run_dir, device)
    print(
        json.dumps(
            {
                k: plan[k]
                for k in ("steps", "train_tokens", "budget", "schedule", "segments", "rates")
            }
        )
    )
    eval_reserve = 60 if device == "cuda" else 20  # seconds an evaluation takes, about
    results = {}
    for name in MODELS:
        result_path = run_dir / name / "result.json"
        if result_path.exists():
            results[name] = json.loads(result_path.read_text())
            continue
        done = (run_dir / name / "progress.json").exists() and json.loads(
            (run_dir / name / "progress.json").read_text()
        ).get("step", -1) >= plan["steps"]
        if not done:
            if time.time() > deadline - eval_reserve:
                break
            done = train(plan, name, run_dir, deadline - eval_reserve, args, device)
        if not done or time.time() > deadline:
            break
        results[name] = evaluate(plan, name, run_dir, device)
        print(
            f"{name}: "
            + ", ".join(f"ppl @ {r['context']} = {r['ppl']:.3f}" for r in results[name]["rows"])
        )
    if len(results) == len(MODELS):
        print_table(plan, results)
        return 0
    print(
        f"\nnot finished ({time.time() - started:.0f} s this call): run the same command "
        "again to go on"
    )
    return 3


if __name__ == "__main__":
    raise SystemExit(main())
