"""timm's own model contract tests, run against every longvit model name.

The test functions come from timm's tests/test_models.py, vendored unchanged in
tests/timm_contract/ (Apache-2.0, see its LICENSE) so that this runs offline.
We run the set timm applies to its own ViTs (``vit_*`` are in timm's
NON_STD_FILTERS and FEAT_INTER_FILTERS): forward (with the grad-checkpointing
equality check), backward (every parameter gets a gradient), the non-standard
config/API contract (create_model kwargs, unknown kwargs raise, reset_classifier,
group_matcher, no_weight_decay, meta-device creation, dtype change),
forward_intermediates and features_only, and intermediate-layer pruning.
Not run, with reasons:
- test_model_default_cfgs: wants 4-D (B, C, H, W) features; ours are token
  sequences (timm excludes its ViTs from it the same way).
- test_model_forward_features: timm excludes NON_STD models; features_only is
  covered by test_model_forward_intermediates_features.
- TorchScript and torch.fx tests: the attention core is a custom
  autograd.Function with data-dependent schedules; neither is supported.

Test sizes: timm's tests feed the pretrained_cfg input_size (clamped to their
limits). For a short run the registered cfgs are swapped for the duration of
this module: pixel models at 256 x 256 px (8 x 8 tokens), slide encoders at a
64-channel 7 x 9 grid (63 tiles + class token). The shipped cfgs are untouched.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

timm = pytest.importorskip("timm")

from timm.models import _registry  # noqa: E402

import longvit  # noqa: E402,F401  (registers the models)

PIXEL_MODELS = ["longvit_small", "longvit_base", "longvit_large"]
SLIDE_MODELS = ["longvit_slide_small", "longvit_slide_base"]
ALL_MODELS = PIXEL_MODELS + SLIDE_MODELS
TEST_INPUT_SIZE = {
    **{name: (3, 256, 256) for name in PIXEL_MODELS},
    **{name: (64, 7, 9) for name in SLIDE_MODELS},
}
# pruning at every block index is slow: timm itself keeps it out of CI
PRUNE_MODELS = ["longvit_small", "longvit_slide_small"]

VENDORED = Path(__file__).parent / "timm_contract" / "timm_test_models.py"


def _load_timm_tests():
    spec = importlib.util.spec_from_file_location("timm_test_models", VENDORED)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (AttributeError, ImportError) as err:  # another timm version than vendored
        pytest.skip(f"vendored timm tests do not import with timm {timm.__version__}: {err}")
    return module


timm_tests = _load_timm_tests()


@pytest.fixture(autouse=True, scope="module")
def test_sized_cfgs():
    """Swap in small input sizes for the registered cfgs while this module runs."""
    saved = {}
    for key, cfg in list(_registry._model_pretrained_cfgs.items()):
        name = key.split(".")[0]
        if name in TEST_INPUT_SIZE:
            saved[key] = cfg
            _registry._model_pretrained_cfgs[key] = dataclasses.replace(
                cfg, input_size=TEST_INPUT_SIZE[name]
            )
    assert saved, "longvit cfgs are not registered with timm"
    yield
    _registry._model_pretrained_cfgs.update(saved)


@pytest.mark.parametrize("model_name", ALL_MODELS)
def test_model_forward(model_name):
    timm_tests.test_model_forward(model_name, batch_size=1)


@pytest.mark.parametrize("model_name", ALL_MODELS)
def test_model_backward(model_name):
    timm_tests.test_model_backward(model_name, batch_size=2)


@pytest.mark.parametrize("model_name", ALL_MODELS)
def test_model_default_cfgs_non_std(model_name):
    timm_tests.test_model_default_cfgs_non_std(model_name, batch_size=1, cfg_device="meta")


@pytest.mark.parametrize("model_name", ALL_MODELS)
def test_model_forward_intermediates_features(model_name):
    timm_tests.test_model_forward_intermediates_features(model_name, batch_size=1)


@pytest.mark.parametrize("model_name", ALL_MODELS)
def test_model_forward_intermediates(model_name):
    timm_tests.test_model_forward_intermediates(model_name, batch_size=1)


@pytest.mark.parametrize("model_name", PRUNE_MODELS)
def test_prune_intermediate_layers_contract(model_name):
    timm_tests.test_prune_intermediate_layers_contract(model_name)


def test_every_longvit_name_is_covered():
    assert sorted(timm.list_models("longvit*")) == sorted(ALL_MODELS)


def test_vendored_file_is_timm_unchanged():
    """The vendored file is timm's, plus a header of comment lines only."""
    lines = VENDORED.read_text().splitlines()
    body = [ln for ln in lines if not ln.startswith("# ")]
    assert body[0] == '"""Run tests for all models'
