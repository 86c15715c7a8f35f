"""Slide-conditioned generation: data from HDF5 + manifest, Lightning training on CPU,
the `longvit generate` command, the tokenizers and the shipped config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

h5py = pytest.importorskip("h5py")
pl = pytest.importorskip("lightning.pytorch")

from longvit.cli import main as longvit_main  # noqa: E402
from longvit.models.tokenizer import (  # noqa: E402
    ByteTokenizer,
    cl100k_available,
    get_tokenizer,
    tokenizer_from_config,
)
from longvit.training.captioning import SlideCaptioningModule, cli_main, load_captioner  # noqa: E402
from longvit.training.text_data import (  # noqa: E402
    IGNORE_INDEX,
    SlideTextDataModule,
    read_feature_file,
)

LABEL_TEXT = ["benign tissue", "invasive carcinoma", "necrosis", "normal lymph node"]
TILE = 224  # tile size in level-0 pixels
DIM = 16


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_slide(path: Path, label: int, g: torch.Generator) -> None:
    """A slide of 5-11 tiles whose features carry the label in their mean."""
    n = int(torch.randint(5, 12, (1,), generator=g))
    feats = 0.5 * torch.randn(n, DIM, generator=g)
    feats[:, label] += 2.0
    grid = torch.randperm(40, generator=g)[:n]
    coords = torch.stack([grid % 8, grid // 8], 1).long() * TILE + 5 * TILE  # level-0 pixels
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats.numpy())
        ds = f.create_dataset("coords", data=coords.numpy())
        ds.attrs["patch_size_level0"] = TILE


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("caption")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(40):
        label = i % 4
        name = f"slide_{i}.h5"
        write_slide(root / name, label, g)
        split = "train" if i < 32 else "val"
        rows.append({"features": name, "text": LABEL_TEXT[label], "split": split})
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["features", "text", "split"])
        w.writeheader()
        w.writerows(rows)
    return root / "manifest.csv"


def tiny_module(**kw) -> SlideCaptioningModule:
    torch.manual_seed(0)
    return SlideCaptioningModule(
        encoder="longvit_slide_small",
        encoder_kwargs=dict(in_chans=DIM, embed_dim=32, depth=1, num_heads=2),
        decoder="longnet_decoder_small",
        decoder_kwargs=dict(embed_dim=64, depth=2, num_heads=4, segment_lengths=[8, 16, 32],
                            dilation_rates=[1, 2, 4], sub_ln=False),
        tokenizer="byte", lr=3e-3, warmup_steps=10, **kw,
    )  # fmt: skip


def test_feature_file_coords_become_tile_units(manifest):
    feats, coords = read_feature_file(manifest.parent / "slide_0.h5")
    assert feats.shape[1] == DIM and coords.shape == (feats.shape[0], 2)
    assert torch.equal(coords, coords.round()) and float(coords.min()) >= 0
    with h5py.File(manifest.parent / "bare.h5", "w") as f:
        f["features"], f["coords"] = feats.numpy(), (coords * TILE).long().numpy()
    with pytest.raises(ValueError, match="tile_size_level0"):
        read_feature_file(manifest.parent / "bare.h5")
    _, c2 = read_feature_file(manifest.parent / "bare.h5", tile_size_level0=TILE)
    torch.testing.assert_close(c2, coords)


def test_batches_pad_tiles_and_text(manifest):
    dm = SlideTextDataModule(str(manifest), tokenizer="byte", batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    tok = ByteTokenizer()
    assert batch["features"].shape[0] == 4 and batch["padding_mask"].dtype == torch.bool
    for i, text in enumerate(batch["texts"]):
        ids = [tok.eot_id, *tok.encode(text), tok.eot_id]
        assert batch["tokens"][i, : len(ids) - 1].tolist() == ids[:-1]
        assert batch["targets"][i, : len(ids) - 1].tolist() == ids[1:]
        assert bool((batch["targets"][i, len(ids) - 1 :] == IGNORE_INDEX).all())


def test_conditioned_model_learns_slide_to_text(manifest, tmp_path):
    """Trained on CPU, greedy generation names each held-out slide's label; then the
    checkpoint (with its tokenizer) drives `longvit generate`."""
    module = tiny_module()
    dm = SlideTextDataModule(str(manifest), tokenizer="byte", batch_size=8)
    trainer = pl.Trainer(
        max_steps=200, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, dm)
    module.eval()
    batch = next(iter(SlideTextDataModule(str(manifest), "byte", batch_size=8).val_dataloader()))
    texts = module.generate_text(
        batch["features"], batch["coords"], batch["padding_mask"], max_new_tokens=24,
        temperature=0,
    )  # fmt: skip
    correct = sum(t == ref for t, ref in zip(texts, batch["texts"]))
    assert correct >= 7, list(zip(texts, batch["texts"]))

    ckpt = tmp_path / "captioner.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["tokenizer"]["name"] == "byte"
    loaded = load_captioner(str(ckpt))
    assert loaded.tokenizer.name == "byte"
    out = tmp_path / "reports.jsonl"
    rc = longvit_main(["generate", "--checkpoint", str(ckpt), "--manifest", str(manifest),
                       "--split", "val", "--max-new-tokens", "24", "--out", str(out)])  # fmt: skip
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8
    assert sum(r["text"] == r["reference"] for r in records) >= 7


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    text = "Invasive ductal carcinoma, grade 2 (Nottingham) — ER+ µm"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 258 and max(tok.encode(text)) < 256
    assert tokenizer_from_config(tok.config()).name == "byte"
    with pytest.raises(ValueError, match="tokenizer"):
        get_tokenizer("gpt2")


@pytest.mark.skipif(not cl100k_available(), reason="cl100k_base not available offline")
def test_cl100k_offline():
    tok = get_tokenizer("auto")
    assert tok.name == "cl100k_base" and tok.vocab_size == 100277 and tok.eot_id == 100257
    text = "Hello world <|endoftext|>"
    ids = tok.encode(text)
    assert ids[:2] == [9906, 1917] and tok.eot_id not in ids  # special text stays text
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="had 5 tokens"):
        tokenizer_from_config({"name": "cl100k_base", "vocab_size": 5})


@pytest.mark.parametrize("name", ["caption_slide_small.yaml", "caption_slide_base.yaml"])
def test_shipped_configs_build(name, manifest):
    config = Path(__file__).parents[1] / "configs" / name
    cli = cli_main(
        ["--config", str(config), "--data.manifest", str(manifest), "--model.tokenizer", "byte",
         "--model.encoder_kwargs", '{"in_chans": 1536, "depth": 1}',
         "--model.decoder_kwargs", '{"depth": 1, "pos_embed": "xpos"}',
         "--trainer.accelerator", "cpu", "--trainer.precision", "32"],
        run=False,
    )  # fmt: skip
    assert isinstance(cli.model, SlideCaptioningModule)
    assert cli.datamodule.tokenizer.name == "byte"  # linked to the model's tokenizer
    assert cli.model.model.decoder.pos_embed == "xpos"
