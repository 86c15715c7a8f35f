"""Language modelling on a folder of source files: the corpus split and stream, CausalLM's
training and exact resume, perplexity at several contexts, `longvit lm-eval`, the config."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from longvit.cli import main as longvit_main  # noqa: E402
from longvit.models.tokenizer import ByteTokenizer, cl100k_available  # noqa: E402
from longvit.training import CausalLM, CodeCorpus  # noqa: E402
from longvit.training.causal_lm import decoder_arguments  # noqa: E402
from longvit.training.code_corpus import (  # noqa: E402
    CorpusError,
    PackedTokenStream,
    file_tokens,
    heldout_tokens,
    list_corpus_files,
    split_files,
)
from longvit.training.perplexity import context_perplexity  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm_code.yaml"
TINY = dict(embed_dim=32, depth=1, num_heads=2, segment_lengths=[16, 32, 64],
            dilation_rates=[1, 2, 4])  # fmt: skip
TEST_FRACTION = 0.3


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """24 small Python modules in two packages, plus a file the pattern leaves out."""
    root = tmp_path_factory.mktemp("code")
    r = random.Random(0)
    for i in range(24):
        folder = root / f"pkg{i % 2}"
        folder.mkdir(exist_ok=True)
        lines = [f'"""Module {i}."""', ""]
        for j in range(6):
            a, b = r.randint(0, 9), r.randint(0, 9)
            lines += [f"def f{j}(x):", f"    return x * {a} + {b}", ""]
        (folder / f"mod{i}.py").write_text("\n".join(lines))
    (root / "notes.txt").write_text("not python")
    return root


def tiny_module(**kwargs) -> CausalLM:
    return CausalLM(decoder_kwargs=TINY, tokenizer="byte", warmup_steps=2, lr=3e-3, **kwargs)


def tiny_data(root: Path, **kwargs) -> CodeCorpus:
    args = dict(context=64, batch_size=2, tokenizer="byte", test_fraction=TEST_FRACTION,
                val_tokens=512, num_workers=0)  # fmt: skip
    return CodeCorpus(str(root), **{**args, **kwargs})


# --------------------------------------------------------------- corpus
def test_split_is_by_file_and_stable(corpus, tmp_path):
    files = list_corpus_files(corpus)
    assert len(files) == 24 and all(n.endswith(".py") for n in files.names)
    train, test = split_files(files, TEST_FRACTION)
    assert set(train.names).isdisjoint(test.names) and len(train) + len(test) == 24
    assert 0 < len(test) < 24
    # a glob root names the same files; a file's side never depends on the others
    assert list_corpus_files(f"{corpus}/**/*.py").names == files.names
    fewer = type(files)(files.root, files.paths[::2], files.names[::2])
    assert set(split_files(fewer, TEST_FRACTION)[1].names) == set(test.names) & set(fewer.names)
    with pytest.raises(CorpusError, match="set data.init_args.root"):
        list_corpus_files(tmp_path / "missing")
    with pytest.raises(CorpusError, match="no file matching"):
        list_corpus_files(tmp_path)


def test_stream_packs_every_token_once(corpus):
    files = list_corpus_files(corpus)
    tok = ByteTokenizer()
    stream = [t for chunk in file_tokens(files.paths, tok) for t in chunk]
    windows = list(PackedTokenStream(files.paths, "byte", context=50))
    assert all(w.shape == (51,) for w in windows) and len(windows) == (len(stream) - 1) // 50
    # consecutive windows share one token; together they are the stream, in order
    assert all(int(a[-1]) == int(b[0]) for a, b in zip(windows, windows[1:]))
    rebuilt = [int(windows[0][0])] + [int(t) for w in windows for t in w[1:]]
    assert rebuilt == stream[: len(rebuilt)]
    assert stream.count(tok.eot_id) == len(files)  # one end-of-text after each file


def test_resumed_stream_skips_what_was_trained_on(corpus):
    """Two workers, each its own files; a stream told to skip k batches gives the batches the
    uninterrupted stream gives from batch k on (the DataLoader takes workers in turn)."""
    paths = list_corpus_files(corpus).paths

    def batches(skip: int, n: int) -> list[torch.Tensor]:
        stream = PackedTokenStream(paths, "byte", 40, repeat=True, skip_batches=skip, batch_size=3)
        loader = torch.utils.data.DataLoader(stream, batch_size=3, num_workers=2)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out

    full, resumed = batches(0, 9), batches(5, 4)
    assert all(torch.equal(a, b) for a, b in zip(full[5:], resumed))
    assert not torch.equal(full[0], full[1])  # the workers read different files


# ------------------------------------------------------------ the module
class LossRecorder(pl.Callback):
    """The training loss of each step; stops the run after stop_at steps (of max_steps)."""

    def __init__(self, stop_at: int | None = None):
        self.losses, self.stop_at = {}, stop_at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def fit(module, data, steps, root_dir, ckpt_path=None, stop_at=None) -> LossRecorder:
    recorder = LossRecorder(stop_at)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[recorder], default_root_dir=root_dir,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
    recorder.trainer = trainer
    return recorder


def test_train_resume_and_evaluate(corpus, tmp_path):
    pl.seed_everything(0)
    straight = fit(tiny_module(), tiny_data(corpus), 8, tmp_path)
    assert straight.losses[8] < straight.losses[1] - 0.5  # it learns

    pl.seed_everything(0)
    first = tiny_module()
    part = fit(first, tiny_data(corpus), 8, tmp_path, stop_at=5)  # interrupted at step 5
    assert part.trainer.global_step == 5
    ckpt = tmp_path / "part.ckpt"
    part.trainer.save_checkpoint(ckpt)
    resumed_module = tiny_module()
    resumed = fit(resumed_module, tiny_data(corpus), 8, tmp_path, ckpt_path=str(ckpt))
    for step in (6, 7, 8):  # the same batches and optimizer state as the straight run
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-4)
    assert resumed_module.tokens_seen == 8 * 2 * 64

    # perplexity at two contexts scores the same held-out tokens; at each one it is the
    # mean cross-entropy of the full logits
    model = resumed_module.eval()
    _, test = split_files(list_corpus_files(corpus), TEST_FRACTION)
    tokens = heldout_tokens(test.paths, model.tokenizer, 300)
    rows = context_perplexity(model, tokens, [32, 64], batch_tokens=128)
    assert [r["tokens"] for r in rows] == [256, 256] and [r["windows"] for r in rows] == [8, 4]
    with torch.no_grad():
        windows = tokens[:257].unfold(0, 65, 64)  # (4, 65)
        logits = model(windows[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert rows[1]["loss"] == pytest.approx(float(nll), rel=1e-5)
    assert rows[1]["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)

    # longvit lm-eval reads the run's corpus from the checkpoint
    out = _lm_eval([str(ckpt), "--contexts", "32", "64", "--max-tokens", "256"])
    expected = context_perplexity(first.eval(), tokens, [32, 64])
    for row in expected:
        assert f"| {row['context']} | {row['windows']} | 256 | {row['loss']:.4f} |" in out


def _lm_eval(argv) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert longvit_main(["lm-eval", *argv]) == 0
    return buffer.getvalue()


def test_lm_eval_refuses_what_is_no_checkpoint(tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, bad)
    assert longvit_main(["lm-eval", str(bad), "--root", str(tmp_path)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_decoder_width_argument_and_text_only():
    kwargs = decoder_arguments({"embed_dim": 32})
    assert tiny_module().model.tok_embed.embedding_dim == 32
    assert len(kwargs) == 1 and next(iter(kwargs.values())) == 32
    with pytest.raises(ValueError, match="text-only"):
        decoder_arguments({"cross_attention": True})


@pytest.mark.skipif(not cl100k_available(), reason="cl100k_base not installed")
def test_tokenizer_of_model_and_data_must_agree(corpus, tmp_path):
    with pytest.raises(ValueError, match="same tokenizer"):
        fit(tiny_module(), tiny_data(corpus, tokenizer="cl100k_base"), 1, tmp_path)


def test_config_fits_through_the_cli(corpus, tmp_path, monkeypatch):
    """configs/lm_code.yaml with a tiny model and context: `longvit fit` then `longvit test`."""
    monkeypatch.chdir(tmp_path)
    tiny = str(TINY)
    args = [
        "--config", str(CONFIG), "--data.init_args.root", str(corpus),
        "--data.init_args.tokenizer", "byte", "--model.init_args.tokenizer", "byte",
        "--model.init_args.decoder_kwargs", tiny, "--data.init_args.context", "64",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--data.init_args.test_fraction", str(TEST_FRACTION), "--data.init_args.val_tokens", "256",
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
        "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1",
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert longvit_main(["fit", *args]) == 0
    last = tmp_path / "runs" / "lm_code" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    out = _lm_eval([str(last), "--contexts", "32", "64", "--max-tokens", "128"])
    assert "longnet_decoder_small (dilated attention" in out
