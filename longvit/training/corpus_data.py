"""``CodeCorpus``: a LightningDataModule of packed token windows from a folder of text files.

    data:
      class_path: longvit.training.CodeCorpus
      init_args: {root: /path/to/site-packages, pattern: "**/*.py", context: 2048}

Batches are (B, context + 1) int64 windows (``code_corpus``): the model predicts
``w[:, 1:]`` from ``w[:, :-1]``. Training streams the training files forever (the run ends at
``trainer.max_steps``); validation reads the first ``val_tokens`` tokens of the held-out
files, ``longvit test`` all of them. A run resumed from a checkpoint skips the batches it
trained on (``trainer.global_step x accumulate_grad_batches``), so it goes on through new text.
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from longvit.models.tokenizer import get_tokenizer
from longvit.training.code_corpus import (
    CorpusError,
    CorpusFiles,
    PackedTokenStream,
    list_corpus_files,
    split_files,
)


class CodeCorpus(pl.LightningDataModule):
    """Packed windows of a text corpus, split by file (see ``code_corpus``).

    Args:
        root: a folder of text files, or a glob (``/src/**/*.py``).
        pattern: files under a folder root (``**`` recurses).
        context: tokens per training window (the model sees context, predicts context).
        batch_size: windows per batch; eval_batch_size: for validation / test (default
            batch_size).
        tokenizer: "auto" (cl100k_base when available offline, else bytes), "cl100k_base"
            or "byte": must be the model's (``CausalLM`` checks at setup).
        test_fraction: fraction of files held out (by the hash of their relative path).
        val_tokens: validation reads this many held-out tokens (about); test_tokens: the
            test reads at most this many (None: every held-out file).
        max_file_bytes: larger files are left out (None: none).
        seed: the order of the training files in each pass.
        num_workers: DataLoader workers, each reading and encoding its own files.
    """

    def __init__(
        self,
        root: str,
        pattern: str = "**/*.py",
        context: int = 2048,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        tokenizer: str = "auto",
        test_fraction: float = 0.05,
        val_tokens: int = 1 << 20,
        test_tokens: int | None = None,
        max_file_bytes: int | None = 1_000_000,
        seed: int = 0,
        num_workers: int = 2,
    ):
        super().__init__()
        if context < 1 or batch_size < 1:
            raise ValueError(
                f"context and batch_size must be positive, got {context}, {batch_size}"
            )
        self.tokenizer = get_tokenizer(tokenizer)
        self.save_hyperparameters()
        self.hparams.tokenizer = self.tokenizer.name  # the resolved choice
        self.train_files: CorpusFiles | None = None
        self.test_files: CorpusFiles | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_files is not None:
            return
        h = self.hparams
        files = list_corpus_files(h.root, h.pattern, h.max_file_bytes)
        self.train_files, self.test_files = split_files(files, h.test_fraction)
        if stage in (None, "fit") and len(self.train_files) == 0:
            raise CorpusError(f"corpus root {h.root}: every file is held out; lower test_fraction")
        if stage in (None, "fit", "validate", "test") and len(self.test_files) == 0:
            raise CorpusError(
                f"corpus root {h.root}: no held-out file among {len(files)} (test_fraction "
                f"{h.test_fraction}); raise test_fraction or add files"
            )

    def _loader(self, dataset: PackedTokenStream, batch_size: int, files: int) -> DataLoader:
        workers = min(self.hparams.num_workers, files)
        return DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, pin_memory=True,
            persistent_workers=False, prefetch_factor=4 if workers else None,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        trainer = self.trainer
        skip = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        stream = PackedTokenStream(
            self.train_files.paths, self.tokenizer.name, h.context, repeat=True, seed=h.seed,
            skip_batches=skip, batch_size=h.batch_size,
        )  # fmt: skip
        return self._loader(stream, h.batch_size, len(self.train_files))

    def _heldout(self, max_tokens: int | None) -> DataLoader:
        h = self.hparams
        windows = None if max_tokens is None else max(1, max_tokens // h.context)
        stream = PackedTokenStream(
            self.test_files.paths, self.tokenizer.name, h.context, max_windows=windows
        )
        return self._loader(stream, h.eval_batch_size or h.batch_size, len(self.test_files))

    def val_dataloader(self) -> DataLoader:
        return self._heldout(self.hparams.val_tokens)

    def test_dataloader(self) -> DataLoader:
        return self._heldout(self.hparams.test_tokens)
