"""The decoder's KV-cache steps on CUDA: against full forwards, and replayed as CUDA graphs
(skipped without CUDA).

Run on the GPU machine: PYTHONPATH=. python -m pytest tests/test_decoder_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from longvit.models.decoder import LongNetDecoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SEG, RATES = (64, 128, 256), (1, 2, 4)  # a block of 256 tokens: the cache rolls over


def model(attention: str, dtype: torch.dtype) -> LongNetDecoder:
    torch.manual_seed(0)
    m = LongNetDecoder(
        vocab_size=512, embed_dim=256, depth=3, num_heads=4, segment_lengths=SEG,
        dilation_rates=RATES,
        attention=attention, pos_embed="rope",
    )  # fmt: skip
    return m.to("cuda", dtype).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("attention", ["dilated", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_steps_equal_a_full_forward(attention, dtype):
    m = model(attention, dtype)
    tokens = torch.randint(0, 512, (2, 700), device="cuda")
    with torch.no_grad():
        full = m(tokens).float()
        with m.kv_caches(700):
            steps = [m(tokens[:, :300])] + [m(tokens[:, t : t + 1]) for t in range(300, 700)]
    cached = torch.cat(steps, 1).float()
    assert _rel(cached, full) < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("attention", ["dilated", "dense"])
def test_cuda_graph_replays_equal_eager_steps(attention):
    m = model(attention, torch.float32)
    prompt = torch.randint(0, 512, (2, 200), device="cuda")
    eager = m.generate(prompt, 100, temperature=0)
    graphed = m.generate(prompt, 100, temperature=0, cuda_graph=True)
    assert torch.equal(graphed, eager)
    ragged = m.generate(prompt, 100, temperature=0, prompt_lengths=[200, 57], cuda_graph=True)
    assert torch.equal(ragged[0], eager[0])


def test_cuda_graph_in_bfloat16_runs_and_agrees():
    m = model("dilated", torch.bfloat16)
    prompt = torch.randint(0, 512, (1, 300), device="cuda")
    eager = m.generate(prompt, 64, temperature=0)
    graphed = m.generate(prompt, 64, temperature=0, cuda_graph=True)
    agree = (graphed[:, 300:] == eager[:, 300:]).float().mean()
    assert agree >= 0.9, agree  # bf16 near-ties may flip a greedy token
