"""Segment-length schedules and argument checks for dilated attention."""

from __future__ import annotations

import math
from collections.abc import Sequence

# LongViT and LongNet use these rates throughout.
DEFAULT_DILATION_RATES: tuple[int, ...] = (1, 2, 4, 8, 16)


def segment_schedule(
    num_tokens: int,
    dilation_rates: Sequence[int] = DEFAULT_DILATION_RATES,
    min_segment: int = 1024,
) -> list[int]:
    """Geometric segment lengths from a small local window up to the whole sequence.

    The first segment is N / 16 (at least 64, at most min_segment) rounded to a power
    of two and capped at N, the last is N, and the ones between are log-spaced and
    rounded to powers of two, capped at N (so a short sequence of at most 64 tokens is
    attended in full by every branch, instead of by windows of a token or two),
    as LongViT's published schedules (1,024 tokens: [64, 128, 256, 512, 1024];
    16,384 tokens: [1024, ..., 16384]) and Prov-GigaPath's log-spaced lengths.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    n_branches = len(dilation_rates)
    if n_branches == 0:
        raise ValueError("dilation_rates must name at least one rate")
    if n_branches == 1:
        return [num_tokens]
    first = min(min_segment, max(64, num_tokens // 16))
    first = 2 ** round(math.log2(first))
    first = min(first, num_tokens)
    lengths = []
    for i in range(n_branches):
        if i == n_branches - 1:
            lengths.append(num_tokens)
            continue
        x = math.log2(first) + (math.log2(num_tokens) - math.log2(first)) * i / (n_branches - 1)
        lengths.append(min(num_tokens, 2 ** math.floor(x + 0.5 - 1e-9)))
    for i in range(1, n_branches):  # keep the schedule non-decreasing
        lengths[i] = max(lengths[i], lengths[i - 1])
    return lengths


# LongViT's published segment lengths (torchscale examples/longvit), by image size at 32 px
# patches: token count -> one length per rate of DEFAULT_DILATION_RATES. Any other image
# size keeps the 1024 px lengths, as their model does for an img_size outside this table.
LONGVIT_SEGMENT_LENGTHS: dict[int, tuple[int, ...]] = {
    1024: (64, 128, 256, 512, 1024),  # 1024 px
    16384: (1024, 2048, 4096, 8192, 16384),  # 4096 px
    65536: (1024, 4096, 8192, 16384, 65536),  # 8192 px
    262144: (1024, 4096, 16384, 65536, 262144),  # 16384 px
    1048576: (1024, 4096, 32768, 262144, 1048576),  # 32768 px
}

# The names segment_lengths may take instead of a list: each derives the lengths from the
# token count N of the input (the whole sequence under sequence parallelism).
SCHEDULE_NAMES = ("auto", "longvit")


def longvit_schedule(
    num_tokens: int, dilation_rates: Sequence[int] = DEFAULT_DILATION_RATES
) -> list[int]:
    """LongViT's published segment lengths for an input of num_tokens tokens.

    The table ``LONGVIT_SEGMENT_LENGTHS`` (1024 px -> [64, 128, 256, 512, 1024], ...,
    32768 px -> [1024, 4096, 32768, 262144, 1048576]); any other token count gets the
    1024 px lengths, as torchscale's LongViT does for an image size outside its table.
    Lengths above N act as N (the attention caps them), e.g. a 512 px image (256 tokens)
    attends with [64, 128, 256, 256, 256], the lengths of LongViT's DINO local crops.
    The table is keyed by whole image grids: a sequence of kept (tissue) tokens gets the
    1024 px lengths unless its count is one of the table's. Needs the five rates the table
    was made for (LongViT's [1, 2, 4, 8, 16]).
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    check_schedule_name("longvit", dilation_rates)
    return list(LONGVIT_SEGMENT_LENGTHS.get(num_tokens, LONGVIT_SEGMENT_LENGTHS[1024]))


def resolve_segment_lengths(
    segment_lengths: Sequence[int] | str, num_tokens: int, dilation_rates: Sequence[int]
) -> list[int]:
    """The segment lengths for an input of num_tokens tokens: a list as given, or the
    schedule a name in SCHEDULE_NAMES stands for ("auto": ``segment_schedule``,
    "longvit": ``longvit_schedule``)."""
    if isinstance(segment_lengths, str):
        check_schedule_name(segment_lengths, dilation_rates)
        if segment_lengths == "longvit":
            return longvit_schedule(num_tokens, dilation_rates)
        return segment_schedule(num_tokens, dilation_rates)
    return list(segment_lengths)


def check_schedule_name(name: str, dilation_rates: Sequence[int]) -> None:
    """ValueError unless name is one of SCHEDULE_NAMES and fits the dilation rates."""
    if name not in SCHEDULE_NAMES:
        raise ValueError(
            f"segment_lengths must be a list of positive integers or one of {SCHEDULE_NAMES}, "
            f"got {name!r}"
        )
    if name == "longvit" and len(dilation_rates) != len(DEFAULT_DILATION_RATES):
        raise ValueError(
            f"segment_lengths='longvit' gives {len(DEFAULT_DILATION_RATES)} lengths, one per "
            f"rate of {list(DEFAULT_DILATION_RATES)}; got {len(dilation_rates)} dilation_rates "
            f"{list(dilation_rates)}: pass segment_lengths as a list instead"
        )


def check_schedule(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> None:
    """ValueError naming the argument when the two lists do not describe branches."""
    for name, values in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"{name} must be a list of positive integers, got {values!r}")
        if len(values) == 0:
            raise ValueError(f"{name} must not be empty")
        for x in values:
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{name} must hold positive integers, got {list(values)!r}")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            "segment_lengths and dilation_rates must have the same length (one pair per "
            f"branch), got {len(segment_lengths)} segment_lengths {list(segment_lengths)} "
            f"and {len(dilation_rates)} dilation_rates {list(dilation_rates)}"
        )
