"""Tile-level feature extraction with any timm model (``longvit extract``).

``build_tile_encoder`` makes the model and its preprocessing (weights from a local file only);
``build_preset_encoder`` does it for a published encoder by name (``presets``: Prov-GigaPath,
UNI, UNI2-h, Virchow, Virchow2, H-optimus, Phikon: architecture, preprocessing, pooling, file);
``extract_features`` reads the tile files ``longvit tile`` wrote, runs the encoder over every
tile (DataLoader workers with their own slide handles, bf16 autocast and channels_last on GPU,
several GPUs through Lightning) and writes one TRIDENT/CLAM-layout HDF5 file per slide;
``read_features_h5`` reads ours, TRIDENT's and CLAM's back. Lightning is imported only when
extracting; this package never imports longvit.training.
"""

from longvit.extract.api import extract_features
from longvit.extract.dataset import MultiSlideTileDataset, SlideJob, collate_slide_tiles
from longvit.extract.job import (
    ExtractRun,
    SlideAssembler,
    find_tile_files,
    plan_extraction,
)
from longvit.extract.model import (
    Preprocessing,
    TileEncoder,
    TileEncoderError,
    TilePreprocess,
    build_tile_encoder,
)
from longvit.extract.pooling import TokenPooling
from longvit.extract.preset_encoder import WeightsFileError, build_preset_encoder
from longvit.extract.presets import (
    TILE_ENCODER_PRESETS,
    TileEncoderPreset,
    format_presets,
    get_preset,
)
from longvit.extract.writer import SlideFeatures, read_features_h5, write_features_h5

__all__ = [
    "ExtractRun",
    "MultiSlideTileDataset",
    "Preprocessing",
    "SlideAssembler",
    "SlideFeatures",
    "SlideJob",
    "TILE_ENCODER_PRESETS",
    "TileEncoder",
    "TileEncoderError",
    "TileEncoderPreset",
    "TilePreprocess",
    "TokenPooling",
    "WeightsFileError",
    "build_preset_encoder",
    "build_tile_encoder",
    "collate_slide_tiles",
    "extract_features",
    "find_tile_files",
    "format_presets",
    "get_preset",
    "plan_extraction",
    "read_features_h5",
    "write_features_h5",
]
