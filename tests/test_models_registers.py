"""Register tokens (``reg_tokens``) on the dilated encoders: shapes, padding, pooling, the
local model's blindness, weight decay / LR groups, and sequence parallelism refusing them."""

import re

import pytest
import timm
import timm.optim
import torch

import longvit  # noqa: F401

TINY = dict(embed_dim=64, depth=2, num_heads=4, in_chans=16)


def tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("longvit_slide_small", **dict(TINY, **kwargs)).eval()


def test_registers_follow_the_class_token():
    m = tiny(reg_tokens=2, num_classes=3)
    assert m.num_prefix_tokens == 3 and m.reg_token.shape == (1, 2, 64)
    feats, coords = torch.randn(2, 40, 16), torch.randint(0, 20, (2, 40, 2))
    assert m.forward_features(feats, coords).shape == (2, 43, 64)
    assert m(feats, coords).shape == (2, 3)
    # the registers change the class token's output (they are attended to)
    plain = tiny(num_classes=3)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "reg_token"})
    assert not torch.allclose(plain(feats, coords), m(feats, coords))
    with pytest.raises(ValueError, match="reg_tokens"):
        tiny(reg_tokens=-1)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_padding_never_changes_valid_outputs_with_registers(pool):
    m = tiny(reg_tokens=1, global_pool=pool, num_classes=2)
    feats, coords = torch.randn(2, 50, 16), torch.randint(0, 30, (2, 50, 2))
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 37:] = True  # the second slide has 37 tiles
    batched = m(feats, coords, mask)
    garbage, far = feats.clone(), coords.clone()
    garbage[1, 37:] = 1e3 * torch.randn(13, 16)
    far[1, 37:] = 9999
    torch.testing.assert_close(m(garbage, far, mask), batched, rtol=0, atol=0)


def test_local_model_with_a_register_sees_only_its_first_segment():
    """One segment of 16 at rate 1: class token and register (positions 0-1) never see a
    tile past position 14, however deep the model."""
    m = tiny(reg_tokens=1, segment_lengths=[16], dilation_rates=[1], num_classes=2)
    feats, coords = torch.randn(1, 64, 16), torch.randint(0, 30, (1, 64, 2))
    changed = feats.clone()
    changed[:, 14:] = torch.randn(1, 50, 16)
    torch.testing.assert_close(m(changed, coords), m(feats, coords))
    changed[:, 13] += 1.0
    assert not torch.allclose(m(changed, coords), m(feats, coords))


def test_registers_join_the_stem_group_without_weight_decay():
    m = tiny(reg_tokens=2)
    assert "reg_token" in m.no_weight_decay()
    assert re.match(m.group_matcher()["stem"], "reg_token")
    groups = timm.optim.create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05,
                                            layer_decay=0.75).param_groups  # fmt: skip
    holder = next(g for g in groups if any(p is m.reg_token for p in g["params"]))
    assert holder["weight_decay"] == 0.0


def test_sequence_parallel_refuses_registers():
    with pytest.raises(ValueError, match="reg_tokens=0"):
        tiny(reg_tokens=1, global_pool="avg").set_sequence_parallel(object())
