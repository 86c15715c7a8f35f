"""LightningModule for slide-conditioned report / caption generation, and its LightningCLI.

    python -m longvit.training.captioning fit --config configs/caption_slide_base.yaml

The module builds a ``SlideCaptioner`` (a timm slide encoder + a cross-attending
``LongNetDecoder``) and trains it with next-token cross-entropy on the batches of
``SlideTextDataModule``. The tokenizer is resolved when the module is built
("auto" becomes "cl100k_base" or "byte") and the resolved name is what the
checkpoint keeps (hyper-parameters and ``checkpoint["tokenizer"]``).
"""

from __future__ import annotations

import inspect
import math

import lightning.pytorch as pl
import timm
import torch

import longvit  # noqa: F401  (registers the slide encoders with timm)
from longvit.models.captioner import SlideCaptioner
from longvit.models.decoder import create_decoder
from longvit.models.tokenizer import get_tokenizer, tokenizer_from_config
from longvit.training.text_data import IGNORE_INDEX, SlideTextDataModule
from longvit.weights_file import WeightsFileError, read_lightning_checkpoint


class SlideCaptioningModule(pl.LightningModule):
    """Train a slide encoder + LongNet decoder on (slide features, text) pairs.

    Args:
        encoder: timm name of the slide encoder (``longvit_slide_small`` / ``_base``).
        encoder_kwargs: its arguments (e.g. in_chans = the tile feature width).
        decoder: ``longnet_decoder_small`` or ``longnet_decoder_base``.
        decoder_kwargs: overrides of the decoder size (segment_lengths, pos_embed...).
        tokenizer: "auto", "cl100k_base" or "byte".
        lr, weight_decay, betas: AdamW (no decay on biases and norms).
        warmup_steps: linear warm-up, then cosine decay to min_lr_ratio * lr over
            the trainer's estimated steps.
        grad_checkpointing: recompute encoder and decoder blocks in the backward.
        standardize_features: at the start of fit, standardise the tile features with the
            training split's per-dimension mean and std (``SlideTextDataModule.
            feature_statistics``; kept in the checkpoint). Without it, uncentred encoder
            features leave the memory mostly position embedding and the decoder ignores
            the slide (``longvit.training.feature_statistics``).
    """

    def __init__(
        self,
        encoder: str = "longvit_slide_small",
        encoder_kwargs: dict | None = None,
        decoder: str = "longnet_decoder_small",
        decoder_kwargs: dict | None = None,
        tokenizer: str = "auto",
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        grad_checkpointing: bool = False,
        standardize_features: bool = True,
    ):
        super().__init__()
        self.tokenizer = get_tokenizer(tokenizer)
        self.save_hyperparameters()
        self.hparams.tokenizer = self.tokenizer.name  # the resolved choice goes in checkpoints
        enc = timm.create_model(encoder, num_classes=0, **(encoder_kwargs or {}))
        dec_kwargs = {"cross_attention": True, "memory_dim": enc.embed_dim}
        dec_kwargs.update(decoder_kwargs or {})
        dec = create_decoder(decoder, vocab_size=self.tokenizer.vocab_size, **dec_kwargs)
        self.model = SlideCaptioner(enc, dec)
        if grad_checkpointing:
            enc.set_grad_checkpointing(True)
            dec.set_grad_checkpointing(True)

    def forward(self, features, coords, tokens, padding_mask=None) -> torch.Tensor:
        return self.model(features, coords, tokens, padding_mask)

    def on_fit_start(self) -> None:
        if not self.hparams.standardize_features or bool(self.model.feature_statistics_set):
            return  # off, or already set (a resumed fit, or given before fit)
        data = getattr(self.trainer, "datamodule", None)
        if data is None or not hasattr(data, "feature_statistics"):
            raise ValueError(
                "standardize_features=True needs the training features' statistics: fit with "
                "a SlideTextDataModule, call model.model.set_feature_statistics(mean, std) "
                "before fit, or set standardize_features=False"
            )
        mean, std = data.feature_statistics()
        self.model.set_feature_statistics(mean.to(self.device), std.to(self.device))

    def _loss(self, batch) -> torch.Tensor:
        return self.model.loss(
            batch["features"], batch["coords"], batch["tokens"], batch["targets"],
            batch["padding_mask"], ignore_index=IGNORE_INDEX,
        )  # fmt: skip

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["tokens"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["tokens"].shape[0])
        return loss

    def test_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("test/loss", loss, batch_size=batch["tokens"].shape[0])
        return loss

    @torch.no_grad()
    def generate_text(
        self,
        features: torch.Tensor,
        coords: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        max_new_tokens: int = 256,
        prompt: str | list[str] = "",
        **sampling,
    ) -> list[str]:
        """One text per slide: features (B, N, D), coords (B, N, 2) tile units.

        prompt: the text every report starts with, or one per slide (B strings of any
        lengths: they are right-padded and generated in one batched call, each slide
        continuing after its own prompt).
        """
        tok = self.tokenizer
        b = features.shape[0]
        prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
        if len(prompts) != b:
            raise ValueError(f"prompt: got {len(prompts)} prompts for {b} slides")
        ids = [[tok.eot_id, *tok.encode(p)] for p in prompts]
        lengths = [len(row) for row in ids]
        start = torch.full((b, max(lengths)), tok.pad_id, dtype=torch.int64)
        for i, row in enumerate(ids):
            start[i, : len(row)] = torch.tensor(row)
        out = self.model.generate(
            features, coords, start.to(features.device), max_new_tokens,
            padding_mask=padding_mask, stop_token=tok.eot_id,
            prompt_lengths=None if len(set(lengths)) == 1 else lengths, pad_token=tok.pad_id,
            **sampling,
        )  # fmt: skip
        texts = []
        for row, n, p in zip(out.tolist(), lengths, prompts):
            row = row[n : n + max_new_tokens]
            row = row[: row.index(tok.eot_id)] if tok.eot_id in row else row
            texts.append(p + tok.decode(row))
        return texts

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        h = self.hparams
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": h.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=h.lr, betas=tuple(h.betas),
        )  # fmt: skip
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer else 1
        warmup = min(h.warmup_steps, total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            return h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokenizer"] = self.tokenizer.config()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):  # saved before tile features were standardised: identity
            d_in = self.model.feature_mean.shape[0]
            identity = {"feature_mean": torch.zeros(d_in), "feature_std": torch.ones(d_in),
                        "feature_statistics_set": torch.tensor(False)}  # fmt: skip
            for name, value in identity.items():
                state.setdefault(f"model.{name}", value)
        if "tokenizer" in checkpoint:
            saved = tokenizer_from_config(checkpoint["tokenizer"])
            if saved.name != self.tokenizer.name:
                raise ValueError(
                    f"checkpoint was trained with tokenizer {saved.name!r}, this module was "
                    f"built with {self.tokenizer.name!r}"
                )


def load_captioner(path: str, map_location="cpu") -> SlideCaptioningModule:
    """A trained module from a Lightning checkpoint, with the tokenizer it was trained with.

    The checkpoint is read without running code from it (``longvit.weights_file``); the
    module is built from its saved hyper-parameters and must take its weights exactly, else
    ``WeightsFileError`` names the file and what differs.
    """
    expected = "a captioning checkpoint (SlideCaptioningModule, e.g. last.ckpt of its fit)"
    ckpt = read_lightning_checkpoint(path, expected)
    hparams = ckpt.get("hyper_parameters")
    hparams = dict(hparams) if isinstance(hparams, dict) else {}
    class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    own_path = f"{SlideCaptioningModule.__module__}.{SlideCaptioningModule.__qualname__}"
    init_args = set(inspect.signature(SlideCaptioningModule.__init__).parameters) - {"self"}
    if (class_path not in (None, own_path)) or not {"encoder", "decoder"} <= set(hparams):
        origin = class_path or f"hyper-parameters {sorted(hparams)[:8]}"
        raise WeightsFileError(f"{path}: saved by {origin}, not by {own_path}; expected {expected}")
    saved = ckpt.get("tokenizer") if isinstance(ckpt.get("tokenizer"), dict) else {}
    name = saved.get("name") or hparams.get("tokenizer", "auto")
    tokenizer_from_config(saved or {"name": name})  # fails early if unavailable
    try:
        module = SlideCaptioningModule(
            **{k: v for k, v in hparams.items() if k in init_args and k != "tokenizer"},
            tokenizer=name,
        )
        module.on_load_checkpoint(ckpt)
        module.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:  # arguments or weights that do not fit
        raise WeightsFileError(
            f"{path}: does not rebuild a captioner ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); expected {expected}"
        ) from err
    return module.to(map_location).eval()


def cli_main(argv: list[str] | None = None, run: bool = True):
    """LightningCLI over SlideCaptioningModule and SlideTextDataModule (data.tokenizer follows
    model.tokenizer). run=False builds the objects without a subcommand."""
    from longvit.training.cli import LongViTCLI  # --ckpt_path read safely, weights_only=True

    class CaptioningCLI(LongViTCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments("model.tokenizer", "data.tokenizer")

    return CaptioningCLI(
        SlideCaptioningModule, SlideTextDataModule, args=argv, run=run,
        save_config_kwargs={"overwrite": True},
    )  # fmt: skip


if __name__ == "__main__":
    cli_main()
