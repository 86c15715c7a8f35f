"""A 2-process sequence-parallel Lightning fit on CPU takes the same steps as one process."""

import json
import os
import socket

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import longvit  # noqa: F401  (registers the models)
from longvit.training.sequence_parallel import SequenceParallelStrategy, shard_batch

LENGTHS = [50, 37, 64, 20]


class Slides(Dataset):
    def __len__(self):
        return len(LENGTHS)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        n = LENGTHS[i]
        return {
            "features": torch.randn(n, 8, generator=g, dtype=torch.float64),
            "coords": torch.randint(0, 20, (n, 2), generator=g),
            "label": torch.tensor(i % 2),
        }


def collate(items):
    n = max(x["features"].shape[0] for x in items)
    out = {"features": [], "coords": [], "padding_mask": []}
    for x in items:
        pad = n - x["features"].shape[0]
        out["features"].append(F.pad(x["features"], (0, 0, 0, pad)))
        out["coords"].append(F.pad(x["coords"], (0, 0, 0, pad)))
        out["padding_mask"].append(torch.arange(n) >= x["features"].shape[0])
    batch = {k: torch.stack(v) for k, v in out.items()}
    batch["label"] = torch.stack([x["label"] for x in items])
    return batch


class TinySlideClassifier(pl.LightningModule):
    def __init__(self, log_path):
        super().__init__()
        torch.manual_seed(0)
        self.model = timm.create_model(
            "longvit_slide_small", in_chans=8, embed_dim=16, depth=2, num_heads=2,
            num_classes=2, global_pool="avg", class_token=False,
            segment_lengths=[8, 32, 64], dilation_rates=[1, 2, 4],
        ).double()  # fmt: skip
        self.log_path = log_path

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["features"], batch["coords"], batch["padding_mask"])
        loss = F.cross_entropy(logits, batch["label"])
        with open(f"{self.log_path}.{self.global_rank}", "a") as f:
            f.write(json.dumps(loss.item()) + "\n")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        # Lightning gives distributed training a shuffling DistributedSampler; the single
        # process gets the same sampler for one replica, so both see the same order. With
        # sp_size=2 on 2 processes the data-parallel axis has one replica: both ranks must
        # see every slide (a sampler over all ranks would split them and fail this test).
        sampler = DistributedSampler(Slides(), num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(Slides(), batch_size=2, sampler=sampler, collate_fn=collate)


def _fit(tmp_path, name, **trainer_kwargs):
    module = TinySlideClassifier(str(tmp_path / name))
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module)
    return module


def _losses(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.timeout(300)
def test_two_process_sequence_parallel_fit_matches_one_process(tmp_path):
    single = _fit(tmp_path, "single", devices=1, max_epochs=3)
    strategy = SequenceParallelStrategy(
        sp_size=2, pad_to_multiple=32, start_method="spawn", process_group_backend="gloo"
    )
    sharded = _fit(tmp_path, "sp", devices=2, strategy=strategy, max_epochs=3)
    want = _losses(tmp_path / "single.0")
    assert len(want) == 6
    for rank in (0, 1):  # both ranks of the group computed the whole-slide loss
        assert _losses(tmp_path / f"sp.{rank}") == pytest.approx(want, rel=1e-10)
    for (name, a), (_, b) in zip(
        single.model.state_dict().items(), sharded.model.state_dict().items()
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    assert not torch.allclose(  # and training moved the weights
        single.model.head.weight, TinySlideClassifier("x").model.head.weight
    )


def test_shard_batch_pads_and_masks(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        batch = collate([Slides()[3], Slides()[1]])  # 37 tokens
        out = shard_batch(batch, dist.group.WORLD, pad_to_multiple=16)
        assert out["features"].shape[1] == 48 and out["padding_mask"][:, 37:].all()
        assert out["padding_mask"][0, 20:37].all() and not out["padding_mask"][0, :20].any()
        assert not out["padding_mask"][1, :37].any()
        torch.testing.assert_close(out["label"], batch["label"])
        with pytest.raises(ValueError, match="dict batch"):
            shard_batch({"label": batch["label"]}, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_model_refuses_max_pooling_with_sequence_parallel():
    model = timm.create_model("longvit_slide_small", in_chans=8, embed_dim=16, depth=1,
                              num_heads=2, global_pool="max", class_token=False)  # fmt: skip
    with pytest.raises(ValueError, match="global_pool='avg' or 'token'"):
        model.set_sequence_parallel(object())


def _cls_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _cls_model()
    model.set_sequence_parallel(dist.group.WORLD)
    batch = shard_batch(collate([Slides()[0], Slides()[2]]), dist.group.WORLD, 32, 1)
    logits = model(batch["features"], batch["coords"], batch["padding_mask"])
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for g in grads.values():  # what DDP does
        dist.all_reduce(g)
        g /= world
    torch.save({"logits": logits.detach(), "grads": grads}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def _cls_model():
    torch.manual_seed(0)
    return timm.create_model(
        "longvit_slide_small", in_chans=8, embed_dim=16, depth=2, num_heads=2, num_classes=2,
        segment_lengths=[8, 32, 128], dilation_rates=[1, 2, 4],  # 128 spans both ranks
    ).double()  # fmt: skip


def test_class_token_pooling_with_sequence_parallel_matches_one_process(tmp_path):
    """Two ranks with a class token = one process on [shard 0, pad slot, shard 1]."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_cls_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    # 64 tokens -> 63 per rank (+ 1 slot = 64 = 2 x 32): [cls, t0..t62 | slot, t63, pad...]
    batch = collate([Slides()[0], Slides()[2]])
    lay = {}
    for key in ("features", "coords", "padding_mask"):
        x = batch[key]
        fill = True if key == "padding_mask" else 0
        x = torch.cat([x, x.new_full((x.shape[0], 126 - 64, *x.shape[2:]), fill)], dim=1)
        slot = x.new_full((x.shape[0], 1, *x.shape[2:]), fill)
        lay[key] = torch.cat([x[:, :63], slot, x[:, 63:]], dim=1)  # 127 + cls = 128 tokens
    model = _cls_model()
    logits = model(lay["features"], lay["coords"], lay["padding_mask"])
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for r in (0, 1):
        torch.testing.assert_close(got[r]["logits"], logits.detach(), rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[0]["grads"][name], p.grad, rtol=1e-9, atol=1e-11,
                                   msg=name)  # fmt: skip
