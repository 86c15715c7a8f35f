"""Tile-level feature extraction with any timm model (``longvit extract``).

``build_tile_encoder`` makes the model and its preprocessing (weights from a local file only);
``extract_features`` reads the tile files ``longvit tile`` wrote, runs the encoder over every
tile (DataLoader workers with their own slide handles, bf16 autocast and channels_last on GPU,
several GPUs through Lightning) and writes one TRIDENT/CLAM-layout HDF5 file per slide;
``read_features_h5`` reads ours, TRIDENT's and CLAM's back. Lightning is imported only when
extracting; this package never imports longvit.training.
"""

from longvit.extract.dataset import MultiSlideTileDataset, SlideJob, collate_slide_tiles
from longvit.extract.job import (
    ExtractRun,
    SlideAssembler,
    extract_features,
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
from longvit.extract.writer import SlideFeatures, read_features_h5, write_features_h5

__all__ = [
    "ExtractRun",
    "MultiSlideTileDataset",
    "Preprocessing",
    "SlideAssembler",
    "SlideFeatures",
    "SlideJob",
    "TileEncoder",
    "TileEncoderError",
    "TilePreprocess",
    "build_tile_encoder",
    "collate_slide_tiles",
    "extract_features",
    "find_tile_files",
    "plan_extraction",
    "read_features_h5",
    "write_features_h5",
]
