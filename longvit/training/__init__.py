"""Lightning training on whole slides: manifests, DataModules, LightningModules, the CLI.

- ``manifest``: the CSV that names each slide (pixel mode) or feature file (feature mode),
  its label (or survival time and event) and its split; validated before any training.
- ``feature_data`` / ``pixel_data``: DataModules yielding batches as dicts of tensors with a
  ``padding_mask`` (B, N), True = padding (``collate``).
- ``classification`` / ``survival`` / ``mae`` / ``dino``: LightningModules on ``SlideModule``;
  each calls its network in one method (``forward_model``) so a sequence-parallel strategy
  can wrap it.
- ``optim``: layer-wise LR decay (timm) with warmup + cosine.
- ``heatmap`` / ``prediction_writer``: per-tile importance and the predict outputs.
- ``cli``: ``longvit fit | validate | test | predict`` (LightningCLI).
- ``causal_lm`` / ``corpus_data`` / ``code_corpus`` / ``perplexity``: a LongNet language
  model on a folder of source files (``CausalLM``, ``CodeCorpus``) and ``longvit lm-eval``.
- ``captioning`` / ``text_data``: slide-to-report generation; ``sequence_parallel``: the
  Lightning strategy sharding a slide's tokens over GPUs.

Importing this package imports Lightning; ``longvit.attention`` and ``longvit.models`` never
import it.
"""

from longvit.training.causal_lm import CausalLM
from longvit.training.classification import SlideClassifier
from longvit.training.corpus_data import CodeCorpus
from longvit.training.dino import CropDataModule, SlideDINO
from longvit.training.feature_data import FeatureDataModule, FeatureSlideDataset
from longvit.training.mae import SlideMAE
from longvit.training.manifest import Manifest, ManifestError, ManifestRow, read_manifest
from longvit.training.pixel_data import PixelDataModule, PixelSlideDataset
from longvit.training.prediction_writer import SlidePredictionWriter
from longvit.training.slide_module import SlideModule
from longvit.training.survival import SlideSurvival

__all__ = [
    "CausalLM",
    "CodeCorpus",
    "CropDataModule",
    "FeatureDataModule",
    "FeatureSlideDataset",
    "Manifest",
    "ManifestError",
    "ManifestRow",
    "PixelDataModule",
    "PixelSlideDataset",
    "SlideClassifier",
    "SlideDINO",
    "SlideMAE",
    "SlideModule",
    "SlidePredictionWriter",
    "SlideSurvival",
    "read_manifest",
]
