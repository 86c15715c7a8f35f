"""timm's own model tests, from the installed timm version, run over every longvit model.

The test functions come from timm's tests/test_models.py of ``timm.__version__``, fetched
from timm's source distribution on PyPI once and cached in .cache/timm-tests/
(``timm_model_tests``); without network access and without the cached file these tests skip,
saying so.

Which of timm's tests apply: timm picks models for each test by name patterns. Our names are
not in its lists of transformers (NON_STD_FILTERS, FEAT_INTER_FILTERS), so by name alone timm
would run its convolutional-net tests on them and none of its ViT tests. Our models are ViTs
(token-sequence features): we run what timm runs on its own ViTs, plus features_only
(test_model_forward_features), which our models support too (RUN). The rest is in NOT_RUN
with the reason; ``test_every_model_test_is_sorted`` fails when a timm version adds a
per-model test that is in neither list.

Sizes: timm feeds the pretrained_cfg's input_size, clamping every entry to the test's limit
(96 to 384 px). The pixel models run with their shipped cfgs (3 x 1024 x 1024, clamped). The
slide encoders' input_size is (D_in, rows, cols) of a tile-feature grid, D_in = 1536
(Prov-GigaPath's tile encoder); the clamp would cut D_in while the model still expects 1536
features (timm's create_model takes in_chans from that entry). For this module their cfgs say
(64, 7, 9): 64-d features (in_chans=1536 is covered by tests/test_models_slide_encoder.py) on a
grid of 63 tiles, which keeps the module's time down; the rest of the cfg as shipped.
timm's non-standard cfg test checks outputs only up to 320 px and so skips the pixel models
at 1024 px: it runs once more on them at 256 px (CFG_AT_256). timm keeps
test_prune_intermediate_layers_contract out of its CI (it prunes at every block); here it runs
on every model (longvit_large's 24 blocks: about 40 s of the module's 2 minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect

import pytest
import timm
from timm.models import _registry
from timm_model_tests import TimmTestsUnavailable, load_timm_tests, timm_test_file

import longvit  # noqa: F401  (registers the models)

MODELS = sorted(timm.list_models("longvit*"))
SLIDE_MODELS = [name for name in MODELS if name.startswith("longvit_slide")]
SLIDE_TEST_SIZE = (64, 7, 9)

RUN = [
    "test_model_forward",  # forward, and the same output with grad checkpointing
    "test_model_backward",  # every parameter gets a gradient
    "test_model_default_cfgs_non_std",  # cfg and API contract, as timm checks its ViTs
    "test_model_forward_features",  # features_only=True
    "test_model_forward_intermediates_features",  # features_only='getter' (timm's ViTs)
    "test_model_forward_intermediates",  # forward_intermediates (timm's ViTs)
    "test_prune_intermediate_layers_contract",  # prune_intermediate_layers (timm's ViTs)
    "test_model_forward_fx",  # torch.fx trace equals the model (timm's leaf modules)
    "test_model_backward_fx",  # and trains
]
NOT_RUN = {
    "test_model_default_cfgs": "the cfg contract of models with (B, C, H, W) feature maps "
    "(timm checks its ViTs with test_model_default_cfgs_non_std; this test asserts two "
    "spatial axes, 'TODO add 1D sequence support')",
    "test_model_forward_torchscript": "TorchScript: the dilated attention is an autograd "
    "Function over a data-dependent schedule; torch.jit.script is deprecated upstream",
    "test_model_forward_fx_torchscript": "TorchScript of the traced model's leaf modules (the "
    "attention among them; see test_model_forward_torchscript)",
    "test_model_load_pretrained": "applies to models with published weights; longvit "
    "publishes none (nothing downloads)",
    "test_model_features_pretrained": "applies to models with published weights",
    "test_model_inference": "applies to timm's test_* models, with reference outputs on the hub",
}
# timm's own ViT: a per-model test that runs on it applies to our models too
REFERENCE_VIT = "vit_small_patch16_224"


@pytest.fixture(scope="module")
def timm_tests(pytestconfig):
    try:
        path = timm_test_file(timm.__version__)
    except TimmTestsUnavailable as err:
        pytest.skip(f"timm's model tests for timm {timm.__version__} are not available: {err}")
    return load_timm_tests(path, pytestconfig)


@pytest.fixture(scope="module", autouse=True)
def slide_cfgs_with_test_width():
    """The slide encoders' cfgs with input_size SLIDE_TEST_SIZE while this module runs."""
    saved = {}
    for key, cfg in list(_registry._model_pretrained_cfgs.items()):
        if key.split(".")[0] in SLIDE_MODELS:
            saved[key] = cfg
            _registry._model_pretrained_cfgs[key] = dataclasses.replace(
                cfg, input_size=SLIDE_TEST_SIZE
            )
    assert saved, "the slide encoders' cfgs are not registered with timm"
    yield
    _registry._model_pretrained_cfgs.update(saved)


def _arguments(test_fn, model_name: str) -> dict:
    """model_name, plus batch_size as timm parametrizes it and cfg_device as its fixture
    gives it on current PyTorch ("meta")."""
    params = inspect.signature(test_fn).parameters
    kwargs = {"model_name": model_name}
    if "batch_size" in params:
        sizes = [m.args[1] for m in _marks(test_fn) if m.args[0] == "batch_size"]
        kwargs["batch_size"] = sizes[0][0] if sizes else 1
    if "cfg_device" in params:
        kwargs["cfg_device"] = "meta"
    return kwargs


def _marks(test_fn) -> list:
    return [m for m in getattr(test_fn, "pytestmark", []) if m.name == "parametrize"]


def _model_names(test_fn) -> list[str]:
    for mark in _marks(test_fn):
        if mark.args[0] == "model_name":
            return [str(v) for v in mark.args[1]]
    return []


PIXEL_MODELS = [name for name in MODELS if name not in SLIDE_MODELS]
CFG_AT_256 = (3, 256, 256)
CASES = [
    *[pytest.param(test, model, None, id=f"{test}-{model}") for test in RUN for model in MODELS],
    *[
        pytest.param(test, model, CFG_AT_256, id=f"{test}-{model}-256px")
        for test in ["test_model_default_cfgs_non_std"]
        for model in PIXEL_MODELS
    ],
]


@pytest.mark.parametrize("test_name, model_name, input_size", CASES)
def test_timm_model_test(timm_tests, test_name, model_name, input_size):
    test_fn = getattr(timm_tests, test_name)
    with _registered_input_size(model_name, input_size):
        test_fn(**_arguments(test_fn, model_name))


@contextlib.contextmanager
def _registered_input_size(model_name: str, input_size):
    """The model's registered cfgs with this input_size for the duration (None: as they are)."""
    saved = {}
    if input_size is not None:
        for key, cfg in list(_registry._model_pretrained_cfgs.items()):
            if key.split(".")[0] == model_name:
                saved[key] = cfg
                _registry._model_pretrained_cfgs[key] = dataclasses.replace(
                    cfg, input_size=input_size
                )
    try:
        yield
    finally:
        _registry._model_pretrained_cfgs.update(saved)


def test_every_model_test_is_sorted(timm_tests):
    """Each of timm's per-model tests that timm runs on its ViT or on our names is in RUN or
    NOT_RUN, and each test in RUN still exists in this timm version."""
    applies = set()
    for name, test_fn in vars(timm_tests).items():
        if name.startswith("test_") and callable(test_fn):
            names = {n.split(".")[0] for n in _model_names(test_fn)}
            if REFERENCE_VIT in names or names & set(MODELS):
                applies.add(name)
    assert applies - set(RUN) - set(NOT_RUN) == set(), "timm has new per-model tests: sort them"
    # (some NOT_RUN tests exist only outside GitHub Actions)
    missing = [n for n in RUN if not hasattr(timm_tests, n)]
    assert not missing, f"not in timm {timm.__version__}'s tests: {missing}"


def test_models_are_registered():
    assert (
        MODELS == sorted(["longvit_small", "longvit_base", "longvit_large", *SLIDE_MODELS])
        and len(SLIDE_MODELS) == 2
    )
