"""The extraction model path's settings: bf16 weights without autocast, compiled blocks and the
padding that keeps a compiled model at one batch shape."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from longvit.extract import TileEncoderError, build_preset_encoder, build_tile_encoder

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 2}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    enc = build_preset_encoder("virchow2", random_init=True, model_kwargs=TINY)
    for block in enc.model.vit.blocks:  # LayerScale's 1e-5 init would hide the blocks
        torch.nn.init.normal_(block.ls1.gamma, std=0.5)
        torch.nn.init.normal_(block.ls2.gamma, std=0.5)
    return enc


def tiles(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8, generator=g)


def test_bf16_weights_run_without_autocast_close_to_fp32(encoder):
    bf16 = encoder.replace(precision="bf16-true")
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert all(p.dtype == torch.float32 for p in encoder.model.parameters())  # a copy was cast
    x = tiles(4)
    with torch.no_grad():
        want, got = encoder(x), bf16(x)
    assert got.dtype == torch.float32 and got.shape == want.shape == (4, 96)
    assert not torch.equal(got, want)  # it did run in bf16
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2 * want.abs().max())
    assert bf16.identity()["precision"] == "bf16-true"
    assert {k: v for k, v in bf16.identity().items() if k != "precision"} == {
        k: v for k, v in encoder.identity().items() if k != "precision"
    }
    with pytest.raises(TileEncoderError, match="precision must be one of"):
        encoder.replace(precision="int8")


def test_compiled_blocks_pad_short_batches_to_one_shape(encoder):
    compiled = encoder.replace(compile="eager")  # dynamo without code generation: fast on CPU
    assert all(b._compiled_call_impl is not None for b in compiled.model.vit.blocks)
    assert encoder.model.vit.blocks[0]._compiled_call_impl is None  # the original is untouched
    x = tiles(5)
    with torch.no_grad():
        want = encoder(x)
        full = compiled(x)
        short = compiled(x[:2])  # padded to 5 rows, the first 2 returned
    assert compiled._padded_batch == 5
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short, want[:2], rtol=1e-5, atol=1e-5)
    assert short.shape == (2, 96)
    assert compiled.identity() == encoder.identity()  # compiling changes no feature file


def test_models_without_blocks_compile_whole():
    net = build_tile_encoder("resnet18", random_init=True, compile="eager")
    assert net.model._compiled_call_impl is not None
    with torch.no_grad():
        assert net(tiles(2)[:, :64, :64]).shape == (2, 512)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["gigapath", "virchow2"])
def test_compiled_bf16_weights_on_gpu_close_to_fp32(name):
    """Inductor-compiled blocks with bf16 weights on the GPU: the fp32 eager features within
    bf16 round-off, short batches padded without a recompile."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        ref = build_preset_encoder(name, random_init=True, model_kwargs=TINY)
    fast = ref.replace(precision="bf16-true", compile="inductor")
    x = tiles(8).cuda()
    if name == "gigapath":
        x = torch.nn.functional.pad(x, (0, 0, 16, 16, 16, 16), value=128)  # its 256-px tiles
    with torch.inference_mode():
        want, got, short = ref(x), fast(x), fast(x[:3])
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2 * want.abs().max())
    torch.testing.assert_close(short, got[:3], rtol=0, atol=1e-2 * want.abs().max())


def test_blocks_that_differ_compile_as_one_model():
    """efficientnet's blocks are stages of different shapes: the model compiles whole."""
    net = build_tile_encoder("efficientnet_b0", random_init=True, compile="eager")
    assert net.model._compiled_call_impl is not None
    assert net.model.blocks[0]._compiled_call_impl is None
