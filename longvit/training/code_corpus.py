"""A corpus of text files (source code) as packed token sequences, streamed file by file.

    files = list_corpus_files("/path/to/site-packages", "**/*.py")
    train, test = split_files(files, test_fraction=0.05)
    stream = PackedTokenStream(train.paths, tokenizer="byte", context=2048, repeat=True)

- Files: ``root`` is a folder (the files under it matching ``pattern``) or a glob itself
  (``/data/**/*.py``). Files larger than ``max_file_bytes`` are left out (generated tables).
- Split: by file, deterministic: a file is held out when the SHA-1 of its path relative to
  the root falls below ``test_fraction`` (the same files on every machine, whatever else the
  folder holds), so no held-out text is ever trained on.
- Packing: each file is encoded (its bytes as UTF-8, undecodable bytes replaced) and followed
  by the end-of-text token; the token stream is cut into windows of ``context + 1`` tokens
  that overlap by one (inputs ``w[:-1]``, targets ``w[1:]``): every token after the first is
  predicted exactly once. A window may span files (separated by end-of-text), as GPT's.
- Streaming: an ``IterableDataset`` reading one file at a time; memory is one file plus one
  window, never the corpus. Files are sharded over distributed ranks and DataLoader workers
  (file i goes to shard i mod shards). A training stream (``repeat=True``) never ends: pass p
  shuffles the files with seed + p. It can skip the batches a resumed run already trained on.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from longvit.models.tokenizer import get_tokenizer

GLOB_CHARACTERS = "*?["


class CorpusError(ValueError):
    """A corpus that cannot give what was asked (no files, too few held-out tokens); the
    message names the root and the fix."""


@dataclass(frozen=True)
class CorpusFiles:
    """Files of a corpus: absolute ``paths`` and their ``names`` relative to ``root``."""

    root: str
    paths: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def list_corpus_files(
    root: str | os.PathLike, pattern: str = "**/*.py", max_file_bytes: int | None = 1_000_000
) -> CorpusFiles:
    """The corpus files, sorted by relative name.

    root: a folder (files matching ``pattern`` under it, recursively with ``**``) or a glob
    (``/data/**/*.py``; names are then relative to the glob's folder part).
    """
    root = str(root)
    if any(c in root for c in GLOB_CHARACTERS):
        parts = Path(root).parts
        fixed = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARACTERS))
        base = str(Path(*parts[:fixed])) if fixed else "."
        found = glob.glob(root, recursive=True)
    else:
        if not os.path.isdir(root):
            raise CorpusError(
                f"corpus root {root} is not a folder (nor a glob such as '{root}/**/*.py'); "
                "set data.init_args.root (--corpus for the benchmark)"
            )
        base = root
        found = glob.glob(os.path.join(glob.escape(root), pattern), recursive=True)
    pairs = []
    for path in found:
        if not os.path.isfile(path):
            continue
        if max_file_bytes is not None and os.path.getsize(path) > max_file_bytes:
            continue
        pairs.append((Path(os.path.relpath(path, base)).as_posix(), os.path.abspath(path)))
    pairs.sort()
    if not pairs:
        raise CorpusError(
            f"corpus root {root} holds no file matching {pattern!r} (of at most "
            f"{max_file_bytes} bytes); set data.init_args.root / pattern"
        )
    return CorpusFiles(base, tuple(p for _, p in pairs), tuple(n for n, _ in pairs))


def heldout_score(name: str) -> float:
    """A number in [0, 1) fixed by a file's relative name: SHA-1 of the name, first 8 bytes."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_files(files: CorpusFiles, test_fraction: float) -> tuple[CorpusFiles, CorpusFiles]:
    """(train, test): a file is held out when ``heldout_score(name) < test_fraction``."""
    if not 0 <= test_fraction < 1:
        raise CorpusError(f"test_fraction must be in [0, 1), got {test_fraction}")
    held = [heldout_score(n) < test_fraction for n in files.names]

    def pick(flag: bool) -> CorpusFiles:
        kept = [i for i, h in enumerate(held) if h == flag]
        return CorpusFiles(
            files.root, tuple(files.paths[i] for i in kept), tuple(files.names[i] for i in kept)
        )

    return pick(False), pick(True)


def read_text(path: str) -> str:
    """A file's text: UTF-8, undecodable bytes replaced (a corpus file is never refused)."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def file_tokens(paths: Sequence[str], tokenizer) -> Iterator[list[int]]:
    """Each file's tokens followed by the end-of-text token, one file at a time."""
    for path in paths:
        try:
            text = read_text(path)
        except OSError:  # a file removed or unreadable since the listing: the rest goes on
            continue
        yield [*tokenizer.encode(text), tokenizer.eot_id]


def windows(chunks: Iterator[list[int]], context: int) -> Iterator[list[int]]:
    """Windows of context + 1 tokens, consecutive windows sharing one token (module doc)."""
    size = context + 1
    buffer: list[int] = []
    start = 0
    for chunk in chunks:
        buffer.extend(chunk)
        while len(buffer) - start >= size:
            yield buffer[start : start + size]
            start += context
        if start > 1 << 16:  # drop what every later window has passed
            del buffer[:start]
            start = 0


class PackedTokenStream(IterableDataset):
    """Packed windows (context + 1,) int64 of a list of files, streamed (module doc).

    Args:
        paths: the files (a split of ``list_corpus_files``).
        tokenizer: a name for ``get_tokenizer`` ("byte", "cl100k_base"); built in each worker.
        context: tokens a model sees (windows hold context + 1).
        repeat: never end (training): pass p visits the files in the order of
            ``random.Random(seed + p)``; else one pass in sorted order.
        max_windows: stop after this many windows in all (split over the shards).
        skip_batches, batch_size: leave out the first skip_batches batches of batch_size
            windows that a DataLoader over this stream would give (a resumed run); batches
            come from the workers in turn, as PyTorch's DataLoader takes them.
    """

    def __init__(
        self,
        paths: Sequence[str],
        tokenizer: str = "byte",
        context: int = 2048,
        repeat: bool = False,
        seed: int = 0,
        max_windows: int | None = None,
        skip_batches: int = 0,
        batch_size: int = 1,
    ):
        super().__init__()
        if context < 1:
            raise CorpusError(f"context must be a positive number of tokens, got {context}")
        self.paths = list(paths)
        self.tokenizer = tokenizer
        self.context = int(context)
        self.repeat, self.seed = repeat, seed
        self.max_windows = max_windows
        self.skip_batches, self.batch_size = int(skip_batches), int(batch_size)

    def _pass_order(self, p: int) -> list[str]:
        if not self.repeat:
            return self.paths
        order = list(self.paths)
        random.Random(self.seed + p).shuffle(order)
        return order

    def _chunks(self, shard: int, shards: int) -> Iterator[list[int]]:
        tok = get_tokenizer(self.tokenizer)
        p = 0
        while True:
            yield from file_tokens(self._pass_order(p)[shard::shards], tok)
            if not self.repeat:
                return
            p += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        rank, ranks = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Global batch j comes from worker j mod workers, and a DataLoader starts with worker 0:
        # after skipping n batches, worker w goes on with the stream of worker (w + n) mod
        # workers, past that stream's batches among the first n.
        role = (worker + self.skip_batches) % workers
        skip = max(0, (self.skip_batches - role + workers - 1) // workers) * self.batch_size
        shard, shards = rank * workers + role, ranks * workers
        limit = None
        if self.max_windows is not None:
            limit = self.max_windows // shards + (shard < self.max_windows % shards)
        given = 0
        for i, window in enumerate(windows(self._chunks(shard, shards), self.context)):
            if i < skip:
                continue
            if limit is not None and given >= limit:
                return
            given += 1
            yield torch.tensor(window, dtype=torch.int64)


def heldout_tokens(paths: Sequence[str], tokenizer, max_tokens: int) -> torch.Tensor:
    """The first max_tokens tokens (int64, at most) of the files in their given order, each
    file followed by end-of-text; read one file at a time."""
    out: list[int] = []
    for chunk in file_tokens(paths, tokenizer):
        out.extend(chunk[: max_tokens - len(out)])
        if len(out) >= max_tokens:
            break
    return torch.tensor(out, dtype=torch.int64)
