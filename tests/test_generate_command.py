"""``longvit generate`` batches slides and prompts of different lengths in one call."""

import csv
import json

import h5py
import lightning.pytorch as pl
import torch

from longvit.cli import main as longvit_main
from longvit.training.captioning import SlideCaptioningModule, load_captioner
from longvit.training.text_data import SlideTextDataModule

PROMPTS = ["", "a", "tumour ", "no", "benign tissue"]


def _captioner(root):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, prompt in enumerate(PROMPTS):
        n = 5 + 3 * i  # slides of different tile counts: batches pad and mask tiles
        with h5py.File(root / f"s{i}.h5", "w") as f:
            f["features"] = (torch.randn(n, 8, generator=g) + 3.0).numpy()
            f.create_dataset("coords", data=(torch.arange(2 * n).reshape(n, 2) * 224).numpy())
            f["coords"].attrs["patch_size_level0"] = 224
        rows.append({"features": f"s{i}.h5", "text": "tumour", "split": "train",
                     "prompt": prompt})  # fmt: skip
    with (root / "m.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    torch.manual_seed(0)
    module = SlideCaptioningModule(
        encoder_kwargs=dict(in_chans=8, embed_dim=16, depth=1, num_heads=2),
        decoder_kwargs=dict(embed_dim=16, depth=2, num_heads=2, segment_lengths=[4, 8],
                            dilation_rates=[1, 2]),
        tokenizer="byte", warmup_steps=1,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, SlideTextDataModule(str(root / "m.csv"), tokenizer="byte", batch_size=2))
    trainer.save_checkpoint(root / "captioner.ckpt")
    return root / "captioner.ckpt", root / "m.csv"


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batched_ragged_prompts_equal_one_slide_at_a_time(tmp_path):
    ckpt, manifest = _captioner(tmp_path)
    module = load_captioner(str(ckpt))
    # the fit set the training split's feature statistics, and the checkpoint keeps them
    assert bool(module.model.feature_statistics_set)
    assert 2.5 < float(module.model.feature_mean.mean()) < 3.5
    outs = {}
    for batch in (1, 5):
        out = tmp_path / f"b{batch}.jsonl"
        argv = ["generate", "--checkpoint", str(ckpt), "--manifest", str(manifest),
                "--prompt-column", "prompt", "--batch-size", str(batch),
                "--max-new-tokens", "6", "--out", str(out)]  # fmt: skip
        assert longvit_main(argv) == 0
        outs[batch] = _records(out)
    assert outs[1] == outs[5] and len(outs[5]) == len(PROMPTS)
    for record, prompt in zip(outs[5], PROMPTS):
        assert record["text"].startswith(prompt) and len(record["text"]) > len(prompt)


def test_a_checkpoint_without_feature_statistics_loads_as_identity(tmp_path):
    ckpt, _ = _captioner(tmp_path)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for name in ("feature_mean", "feature_std", "feature_statistics_set"):
        del state["state_dict"][f"model.{name}"]
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    model = load_captioner(str(old)).model
    assert not bool(model.feature_statistics_set)
    assert bool((model.feature_mean == 0).all()) and bool((model.feature_std == 1).all())
