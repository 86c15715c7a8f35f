"""Loading local weights: .safetensors, .pth, Lightning checkpoints, resampled pos_embed."""

import pytest
import timm
import torch
from safetensors.torch import save_file

import longvit  # noqa: F401
from longvit.models import checkpoint_filter_fn
from longvit.models.pos_embed import resample_pos_embed

TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=128, num_classes=3)


def _create(**kwargs):
    return timm.create_model("longvit_small", **dict(TINY, **kwargs)).eval()


def _same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k not in skip:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_from_local_file(tmp_path, suffix):
    torch.manual_seed(0)
    src = _create()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    overlay = dict(file=str(path), num_classes=3)
    torch.manual_seed(1)
    dst = _create(pretrained=True, pretrained_cfg_overlay=overlay)
    _same_weights(src, dst)
    x = torch.randn(1, 3, 96, 64)
    torch.testing.assert_close(dst(x), src(x))


def test_pretrained_resamples_pos_embed_to_new_img_size(tmp_path):
    torch.manual_seed(0)
    src = _create()  # 128 px -> 4 x 4 table
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    dst = _create(
        img_size=192, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=3)
    )
    assert dst.pos_embed.shape == (1, 36, 64)
    expected = resample_pos_embed(src.pos_embed.detach(), (4, 4), (6, 6))
    torch.testing.assert_close(dst.pos_embed.detach(), expected)
    _same_weights(src, dst, skip={"pos_embed"})


def test_lightning_checkpoint_loads_through_timm(tmp_path):
    lightning = pytest.importorskip("lightning")

    class Classifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters()
            self.model = _create()
            self.loss = torch.nn.CrossEntropyLoss()

        def training_step(self, batch, _):
            x, y = batch
            return self.loss(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Classifier()
    data = torch.utils.data.TensorDataset(torch.randn(2, 3, 64, 64), torch.tensor([0, 2]))
    trainer = lightning.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)

    dst = _create(pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
    _same_weights(module.model, dst)
    # the raw checkpoint dict through the filter directly
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert "pytorch-lightning_version" in raw
    filtered = checkpoint_filter_fn(raw, _create())
    assert filtered.keys() == dst.state_dict().keys()


def test_filter_picks_named_prefix_for_two_networks():
    torch.manual_seed(0)
    student, teacher = _create(), _create()
    sd = {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    sd.update({f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()})
    out = checkpoint_filter_fn(sd, _create(), prefix="teacher.backbone.")
    torch.testing.assert_close(out["blocks.0.attn.qkv.weight"], teacher.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="prefix"):
        checkpoint_filter_fn(sd, _create(), prefix="nothing.")


def test_slide_encoder_loads_local_file(tmp_path):
    torch.manual_seed(0)
    kw = dict(embed_dim=64, depth=2, num_heads=4, in_chans=32)
    src = timm.create_model("longvit_slide_small", **kw).eval()
    path = tmp_path / "slide.safetensors"
    save_file(src.state_dict(), str(path))
    dst = timm.create_model(
        "longvit_slide_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw
    ).eval()
    _same_weights(src, dst)


def test_slide_checkpoint_of_another_feature_width_fails_loudly(tmp_path):
    """timm must not swap the input projection for a random one (its RGB first-conv
    adaptation): a checkpoint made for other tile features is refused, naming the layer."""
    kw = dict(embed_dim=64, depth=1, num_heads=4)
    path = tmp_path / "slide32.safetensors"
    save_file(timm.create_model("longvit_slide_small", in_chans=32, **kw).state_dict(), str(path))
    with pytest.raises(RuntimeError, match="feature_proj"):
        timm.create_model("longvit_slide_small", in_chans=48, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)), **kw)  # fmt: skip
