"""DINO self-distillation on slide crops: LongViT's pretraining recipe for the pixel encoder.

Each item is one region of a slide (``crop_size`` pixels at ``target_mpp``, LongViT: 1024 px at
its grid; regions are drawn where ``find_tissue`` sees tissue). From it come two *global* views
(random resized crops of 40-100% of the region at ``global_size``, LongViT 1024 px) and
``n_local`` *local* views (5-40% at ``local_size``, LongViT 512 px), each flipped and colour
jittered (albumentations). The student (the LongViT being pretrained, ``self.model``) sees all
views, the teacher (its exponential moving average) only the global ones; the loss is DINO's
cross-entropy between the centred, sharpened teacher distribution and the student's over
``out_dim`` prototypes, for every pair of different views. Load the student into timm with
``pretrained_cfg_overlay=dict(file=ckpt)`` (the ``model.`` prefix wins the prefix match; the
teacher's keys are dropped) or name ``prefix="teacher."`` via ``checkpoint_filter_fn``.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from longvit.slides import Slide, TileGrid, find_tissue, select_tiles
from longvit.training.datamodule import ManifestDataModule
from longvit.training.manifest import ManifestError, ManifestRow
from longvit.training.sampling import split_key
from longvit.training.slide_module import SlideModule


# ------------------------------------------------------------------------- data
def crop_transforms(global_size: int, local_size: int):
    """(global transform, local transform): random resized crop, flips, colour jitter."""
    import albumentations as A

    colour = [
        A.RandomBrightnessContrast(0.15, 0.15, p=0.8),
        A.HueSaturationValue(10, 15, 10, p=0.8),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
    ]
    global_t = A.Compose(
        [A.RandomResizedCrop((global_size, global_size), scale=(0.4, 1.0)), *colour]
    )
    local_t = A.Compose([A.RandomResizedCrop((local_size, local_size), scale=(0.05, 0.4)), *colour])
    return global_t, local_t


class SlideCropDataset(Dataset):
    """``crops_per_slide`` items per slide; each: ``global`` (2, 3, G, G) uint8, ``local``
    (n_local, 3, L, L) uint8, ``slide_id``. Crop places and augmentations come from the item
    seed (``EpochSampler``)."""

    def __init__(self, rows: list[ManifestRow], *, target_mpp: float, crop_size: int,
                 global_size: int, local_size: int, n_local: int, crops_per_slide: int,
                 mpp_override: float | None):  # fmt: skip
        self.rows, self.target_mpp, self.crop_size = rows, target_mpp, crop_size
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.crops_per_slide, self.mpp_override = crops_per_slide, mpp_override
        self._places: dict[int, np.ndarray] = {}  # per worker: tissue crop corners per slide
        self._transforms = None

    def __len__(self) -> int:
        return len(self.rows) * self.crops_per_slide

    def places(self, index: int, slide: Slide) -> np.ndarray:
        """Level-0 (x, y) corners of the crop-sized grid cells holding tissue."""
        if index not in self._places:
            grid = TileGrid.for_slide(slide, self.target_mpp, self.crop_size)
            tissue, _ = find_tissue(slide)
            coords = select_tiles(grid, tissue, 0.25).coords
            if len(coords) == 0:
                raise ManifestError(
                    f"{slide.path}: no {self.crop_size} px region with tissue at "
                    f"{self.target_mpp} um/px; lower data.crop_size or remove the slide"
                )
            self._places[index] = coords
        return self._places[index]

    def __getitem__(self, key) -> dict:
        index, seed = split_key(key)
        seed = index if seed is None else seed
        rng = np.random.default_rng(seed)
        row = self.rows[index // self.crops_per_slide]
        if self._transforms is None:
            self._transforms = crop_transforms(self.global_size, self.local_size)
        global_t, local_t = self._transforms
        with Slide(row.slide, mpp_override=self.mpp_override) as slide:
            places = self.places(index // self.crops_per_slide, slide)
            x, y = places[rng.integers(len(places))]
            region = slide.read_region_at_mpp(
                (int(x), int(y)), (self.crop_size, self.crop_size), self.target_mpp
            )
        views_g, views_l = [], []
        for i in range(2 + self.n_local):
            t = global_t if i < 2 else local_t
            t.set_random_seed(int(rng.integers(2**31)))
            (views_g if i < 2 else views_l).append(t(image=region)["image"])
        out = {"global": _stack(views_g), "slide_id": row.slide_id}
        if views_l:
            out["local"] = _stack(views_l)
        return out


def _stack(views: list[np.ndarray]) -> torch.Tensor:
    """(h, w, 3) uint8 views -> (V, 3, h, w) uint8 tensor."""
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).contiguous()


class CropDataModule(ManifestDataModule):
    """DINO crops from the slides of a manifest (columns slide, split; no labels needed).

    Args:
        target_mpp: microns per pixel of the crops.
        crop_size: side of the region read per item, pixels (LongViT: 1024).
        global_size / local_size: sides of the global / local views (LongViT: 1024 / 512).
        n_local: local views per item.
        crops_per_slide: items per slide per epoch.
        mpp_override: level-0 mpp for slides without metadata.
        (manifest, batch_size, num_workers, seed: see ``ManifestDataModule``.)
    """

    mode = "pixels"

    def __init__(self, manifest: str | os.PathLike, target_mpp: float = 0.5,
                 crop_size: int = 1024, global_size: int = 1024, local_size: int = 512,
                 n_local: int = 4, crops_per_slide: int = 16, mpp_override: float | None = None,
                 **kwargs):  # fmt: skip
        kwargs.setdefault("task", "none")
        kwargs.setdefault("max_tokens", None)
        super().__init__(manifest, **kwargs)
        sizes = dict(crop_size=crop_size, global_size=global_size, local_size=local_size,
                     crops_per_slide=crops_per_slide)  # fmt: skip
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        self.crop_args = dict(
            target_mpp=target_mpp, crop_size=crop_size, global_size=global_size,
            local_size=local_size, n_local=n_local, crops_per_slide=crops_per_slide,
            mpp_override=mpp_override,
        )  # fmt: skip

    def make_dataset(self, rows: list[ManifestRow], max_tokens: int | None, split: str) -> Dataset:
        return SlideCropDataset(rows, **self.crop_args)


# ------------------------------------------------------------------------ model
class DINOHead(nn.Module):
    """DINO's projection head: MLP (GELU) -> L2-normalised bottleneck -> weight-normed linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(), nn.Linear(hidden_dim, bottleneck),
        )  # fmt: skip
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class SlideDINO(SlideModule):
    """DINO pretraining of a pixel encoder (``longvit_small`` by default) on slide crops.

    Args:
        out_dim: prototypes K. head_hidden_dim, head_bottleneck: DINO head size.
        student_temp, teacher_temp: softmax temperatures (0.1, 0.04).
        center_momentum: EMA of the teacher-output centre (0.9).
        ema_momentum: teacher EMA momentum at the start, rising to 1 by a cosine (0.996).
        **kwargs: ``SlideModule``'s.

    Logged: train/loss, train/ema_momentum.
    """

    def __init__(self, out_dim: int = 65536, head_hidden_dim: int = 2048,
                 head_bottleneck: int = 256, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, center_momentum: float = 0.9,
                 ema_momentum: float = 0.996, **kwargs):  # fmt: skip
        kwargs.setdefault("model_name", "longvit_small")
        if not 0 <= ema_momentum <= 1:
            raise ValueError(f"model.ema_momentum must be in [0, 1], got {ema_momentum}")
        super().__init__(num_classes=0, **kwargs)
        self.save_hyperparameters()
        width = self.model.num_features
        self.head = DINOHead(width, out_dim, head_hidden_dim, head_bottleneck)
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.center_momentum, self.ema_momentum = center_momentum, ema_momentum

    def forward_model(self, batch: dict, pre_logits: bool = False):
        """Student logits per view [(B, K)...] (2 global, then local), teacher logits (2, B, K)."""
        views = list(batch["global"].unbind(1))
        if "local" in batch:
            views += list(batch["local"].unbind(1))
        student = [self.head(self.model(_to_float(v))) for v in views]
        with torch.no_grad():
            teacher = torch.stack(
                [self.teacher_head(self.teacher(_to_float(v))) for v in views[:2]]
            )
        return student, teacher

    def dino_loss(self, student: list[torch.Tensor], teacher: torch.Tensor) -> torch.Tensor:
        targets = F.softmax((teacher.float() - self.center) / self.teacher_temp, dim=-1)
        total, pairs = 0.0, 0
        for t_index in range(targets.shape[0]):
            for s_index, s in enumerate(student):
                if s_index == t_index:
                    continue
                log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)
                total = total + (-targets[t_index] * log_p).sum(-1).mean()
                pairs += 1
        with torch.no_grad():  # centre update (all-reduced across ranks by the mean over batch)
            batch_center = teacher.float().mean(dim=(0, 1), keepdim=False)[None]
            self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
        return total / pairs

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.dino_loss(*self.forward_model(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["slide_id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        student, teacher = self.forward_model(batch)
        targets = F.softmax((teacher.float() - self.center) / self.teacher_temp, dim=-1)
        loss = -(targets[0] * F.log_softmax(student[1].float() / self.student_temp, -1)).sum(-1)
        self.log("val/loss", loss.mean(), prog_bar=True, batch_size=len(batch["slide_id"]))

    def extra_param_groups(self) -> list[dict]:
        return [{"params": list(self.head.parameters()), "lr": self.lr,
                 "weight_decay": self.weight_decay}]  # fmt: skip

    def momentum_now(self) -> float:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        progress = min(1.0, self.global_step / total)
        return 1 - (1 - self.ema_momentum) * (math.cos(math.pi * progress) + 1) / 2

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        m = self.momentum_now()
        with torch.no_grad():
            for student, teacher in ((self.model, self.teacher), (self.head, self.teacher_head)):
                for ps, pt in zip(student.parameters(), teacher.parameters()):
                    pt.mul_(m).add_(ps.detach(), alpha=1 - m)
        self.log("train/ema_momentum", m)


def _to_float(views: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float normalised with ImageNet mean / std (the model's default)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=views.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=views.device).view(1, 3, 1, 1)
    return (views.float() / 255.0 - mean) / std
