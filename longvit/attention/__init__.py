"""The attention core: LongNet dilated attention. Imports with torch alone."""

from longvit.attention.backends import BACKENDS, resolve_backend
from longvit.attention.dilated import dilated_attention, dilated_attention_packed
from longvit.attention.module import MultiheadDilatedAttention
from longvit.attention.reference import dilated_attention_reference, multiplicity
from longvit.attention.schedule import (
    DEFAULT_DILATION_RATES,
    check_schedule,
    longvit_schedule,
    segment_schedule,
)
from longvit.attention.sequence_parallel import shard_sequence

__all__ = [
    "BACKENDS",
    "DEFAULT_DILATION_RATES",
    "MultiheadDilatedAttention",
    "check_schedule",
    "dilated_attention",
    "dilated_attention_packed",
    "dilated_attention_reference",
    "longvit_schedule",
    "multiplicity",
    "resolve_backend",
    "segment_schedule",
    "shard_sequence",
]
