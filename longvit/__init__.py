"""longvit: gigapixel whole-slide images, trainable end to end.

Importing longvit registers its models with timm, so
``timm.create_model("longvit_base", num_classes=3)`` works.
The attention core (``longvit.attention``) needs torch alone.
"""

__version__ = "0.1.0"

from longvit.attention import MultiheadDilatedAttention, dilated_attention  # noqa: E402

__all__ = ["MultiheadDilatedAttention", "dilated_attention", "__version__"]

try:  # the models need timm; the attention core does not.
    from longvit import models as _models  # noqa: F401
except ImportError as _err:  # pragma: no cover - only without timm
    if "timm" not in str(_err):
        raise
