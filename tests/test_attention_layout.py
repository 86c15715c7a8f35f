"""Gathers are views where the layout allows; schedules follow LongViT's."""

import torch

from longvit.attention import MultiheadDilatedAttention, dilated_attention_reference
from longvit.attention.layout import BranchLayout, dilated_parts, gather, to_segments
from longvit.attention.schedule import segment_schedule


def test_rate_one_gather_is_a_view():
    x = torch.randn(2, 64, 4, 8)
    lay = BranchLayout.of(64, 4, 16, 1)
    g = gather(x, lay)
    assert g.shape == (8, 16, 4, 8)
    assert g.data_ptr() == x.data_ptr() and g._base is not None


def test_dilated_parts_are_views_of_the_input():
    x = torch.randn(2, 64, 12, 8)
    lay = BranchLayout.of(64, 12, 32, 8)  # G = 2: heads 0-1 offset 0, ... 10-11 offset 5
    seg = to_segments(x, lay)
    parts = dilated_parts(seg, lay)
    assert len(parts) == 1
    part = parts[0]
    assert part.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert part.shape == (2, 2, 4, 6, 2, 8)  # (B, S, m, groups, G, D)
    # head 5 is in group 2 (offset 2): position s * 32 + j * 8 + 2
    torch.testing.assert_close(part[1, 1, 3, 2, 1], x[1, 32 + 3 * 8 + 2, 5])
    part.zero_()  # writing through the view writes into x
    assert x[1, 32 + 3 * 8 + 2, 5].abs().sum() == 0


def test_gathered_size_is_tokens_over_rate():
    x = torch.randn(1, 4096, 12, 8)
    for r in (1, 2, 4, 8, 16):
        lay = BranchLayout.of(4096, 12, 1024, r)
        assert gather(x, lay).numel() == x.numel() // r


def test_partial_head_group():
    x = torch.randn(1, 40, 10, 2)  # H = 10, r = 4: G = 3, heads 9 alone at offset 3
    lay = BranchLayout.of(40, 10, 20, 4)
    assert lay.group == 3 and lay.runs == ((0, 0, 3, 3), (3, 9, 1, 1))
    g = gather(x, lay)  # (B * S, m, H, D)
    torch.testing.assert_close(g[1, 2, 9], x[0, 20 + 2 * 4 + 3, 9])
    torch.testing.assert_close(g[0, 4, 4], x[0, 4 * 4 + 1, 4])


def test_published_longvit_schedules():
    assert segment_schedule(1024) == [64, 128, 256, 512, 1024]
    assert segment_schedule(16384) == [1024, 2048, 4096, 8192, 16384]
    for n in (65536, 262144, 1048576, 5000, 7):
        s = segment_schedule(n)
        assert len(s) == 5 and s[-1] == n and s == sorted(s)
        assert s[0] <= 1024


def test_module_matches_reference_through_projections():
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(24, 6, [8, 16, 32], [1, 2, 4], sub_ln=True).double()
    x = torch.randn(2, 40, 24, dtype=torch.float64)
    b, n, _ = x.shape
    q, k, v = layer.qkv(x).view(b, n, 3, 6, 4).unbind(2)
    ref = dilated_attention_reference(q, k, v, [8, 16, 32], [1, 2, 4]).reshape(b, n, 24)
    want = layer.proj(layer.inner_norm(ref))
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-12)
