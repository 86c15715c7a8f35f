"""``CausalLM``: a LongNet decoder trained as a language model (next-token cross-entropy).

    longvit fit --config configs/lm_code.yaml --data.init_args.root /path/to/code

The network is ``longvit.models.decoder.create_decoder(decoder, vocab_size, **decoder_kwargs)``
without cross-attention (text only); ``decoder_kwargs: {attention: dense}`` gives the dense
causal baseline of LongNet's tables. Batches are (B, T + 1) token windows (``CodeCorpus``);
the loss is the mean next-token cross-entropy in nats over the B x T targets, computed
``loss_chunk_tokens`` logits at a time (a 100K-token vocabulary at 32K context would
otherwise hold 13 GB of logits per sequence). Logged: ``train/loss``, ``train/ppl``,
``train/tokens`` (tokens trained on, all ranks), ``val/loss``, ``val/ppl`` (exp of the mean
loss over every validation token), ``test/loss``, ``test/ppl``. AdamW (no decay on norms and
biases), linear warm-up over ``warmup_steps`` optimizer steps, then cosine to
``min_lr_ratio x lr`` at the trainer's last step.
"""

from __future__ import annotations

import inspect
import math

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric

from longvit.models.decoder import LongNetDecoder, create_decoder
from longvit.models.tokenizer import get_tokenizer, tokenizer_from_config
from longvit.training.optim import build_optimizer, warmup_cosine
from longvit.weights_file import WeightsFileError, read_lightning_checkpoint


def decoder_arguments(kwargs: dict | None) -> dict:
    """decoder_kwargs for the installed decoder: the model width may be given as ``embed_dim``
    (timm's name) or ``dim``; it is passed under the name the decoder's constructor takes."""
    kwargs = dict(kwargs or {})
    params = inspect.signature(LongNetDecoder.__init__).parameters
    for given, other in (("dim", "embed_dim"), ("embed_dim", "dim")):
        if given in kwargs and given not in params and other in params:
            kwargs[other] = kwargs.pop(given)
    if kwargs.get("cross_attention"):
        raise ValueError("CausalLM trains a text-only decoder: decoder_kwargs.cross_attention")
    return kwargs


class CausalLM(pl.LightningModule):
    """A LongNet (or dense) decoder trained on packed text windows (module doc).

    Args:
        decoder: ``longnet_decoder_small`` (6 x 384) or ``longnet_decoder_base`` (LongNet's
            12 x 768).
        decoder_kwargs: overrides (segment_lengths, dilation_rates, attention: dense,
            embed_dim / depth / num_heads, pos_embed...); never cross_attention.
        tokenizer: "auto", "cl100k_base" or "byte" (the data's must be the same).
        lr, weight_decay, betas: AdamW. warmup_steps, min_lr_ratio: the schedule.
        loss_chunk_tokens: logits held at once (B x T positions per chunk, about).
        grad_checkpointing: recompute each decoder layer in the backward.
    """

    def __init__(
        self,
        decoder: str = "longnet_decoder_small",
        decoder_kwargs: dict | None = None,
        tokenizer: str = "auto",
        lr: float = 6e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        loss_chunk_tokens: int = 16384,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.tokenizer = get_tokenizer(tokenizer)
        self.save_hyperparameters()
        self.hparams.tokenizer = self.tokenizer.name  # the resolved choice goes in checkpoints
        self.model = create_decoder(
            decoder, vocab_size=self.tokenizer.vocab_size, **decoder_arguments(decoder_kwargs)
        )
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.tokens_seen = 0
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # ------------------------------------------------------------------ model
    @property
    def attention(self) -> str:
        """ "dilated" (LongNet) or "dense", as decoder_kwargs chose."""
        return (self.hparams.decoder_kwargs or {}).get("attention", "dilated")

    def parameter_counts(self) -> tuple[int, int]:
        """(all parameters, parameters outside the token embedding / tied output head)."""
        total = sum(p.numel() for p in self.model.parameters())
        return total, total - self.model.tok_embed.weight.numel()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab_size)."""
        return self.model(tokens)

    def window_loss(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (B, T + 1) int -> mean next-token cross-entropy (nats) of the B x T targets."""
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise ValueError(
                f"windows must be (B, T + 1) tokens, T >= 1; got {tuple(windows.shape)}"
            )
        inputs, targets = windows[:, :-1], windows[:, 1:]
        chunk = max(1, self.hparams.loss_chunk_tokens // inputs.shape[0])
        return self.model.loss(inputs, targets, chunk_size=chunk)

    # ------------------------------------------------------------------ steps
    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None) if self._trainer else None
        data_tok = getattr(data, "tokenizer", None)
        if data_tok is not None and data_tok.name != self.tokenizer.name:
            raise ValueError(
                f"data.init_args.tokenizer is {data_tok.name!r} but model.init_args.tokenizer is "
                f"{self.tokenizer.name!r}: set both to the same tokenizer"
            )

    def training_step(self, batch, batch_idx):
        loss = self.window_loss(batch)
        self.tokens_seen += (batch.shape[1] - 1) * batch.shape[0] * self.trainer.world_size
        b = batch.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/ppl", loss.detach().exp(), batch_size=b)
        self.log("train/tokens", float(self.tokens_seen), batch_size=b)
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_loss.update(self.window_loss(batch), weight=batch[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", loss.exp())
        self.val_loss.reset()

    def test_step(self, batch, batch_idx):
        self.test_loss.update(self.window_loss(batch), weight=batch[:, 1:].numel())

    def on_test_epoch_end(self) -> None:
        loss = self.test_loss.compute()
        self.log("test/loss", loss)
        self.log("test/ppl", loss.exp())
        self.test_loss.reset()

    def configure_optimizers(self):
        h = self.hparams
        opt = build_optimizer(self.model, h.lr, h.weight_decay, betas=tuple(h.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
        if not math.isfinite(total):
            total = 1 << 30
        warmup = min(h.warmup_steps, total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, warmup, total, h.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokenizer"] = self.tokenizer.config()
        checkpoint["tokens_seen"] = int(self.tokens_seen)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "tokenizer" in checkpoint:
            saved = tokenizer_from_config(checkpoint["tokenizer"])
            if saved.name != self.tokenizer.name:
                raise ValueError(
                    f"checkpoint was trained with tokenizer {saved.name!r}, this module was "
                    f"built with {self.tokenizer.name!r}"
                )
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))


def load_causal_lm(path: str, map_location="cpu") -> tuple[CausalLM, dict]:
    """(module in eval mode, the checkpoint dict) from a Lightning checkpoint of a CausalLM.

    Read without running code from the file (``longvit.weights_file``, weights_only=True);
    the module is rebuilt from the saved hyper-parameters and must take the weights exactly,
    else ``WeightsFileError`` names the file and what differs.
    """
    expected = "a language-model checkpoint (CausalLM, e.g. last.ckpt of its fit)"
    ckpt = read_lightning_checkpoint(path, expected)
    hparams = ckpt.get("hyper_parameters")
    hparams = dict(hparams) if isinstance(hparams, dict) else {}
    class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    own_path = f"{CausalLM.__module__}.{CausalLM.__qualname__}"
    public_path = "longvit.training.CausalLM"
    if class_path not in (None, own_path, public_path) or "decoder" not in hparams:
        origin = class_path or f"hyper-parameters {sorted(hparams)[:8]}"
        raise WeightsFileError(f"{path}: saved by {origin}, not by {own_path}; expected {expected}")
    init_args = set(inspect.signature(CausalLM.__init__).parameters) - {"self"}
    saved = ckpt.get("tokenizer") if isinstance(ckpt.get("tokenizer"), dict) else {}
    name = saved.get("name") or hparams.get("tokenizer", "auto")
    tokenizer_from_config(saved or {"name": name})  # fails early if unavailable here
    try:
        module = CausalLM(
            **{k: v for k, v in hparams.items() if k in init_args and k != "tokenizer"},
            tokenizer=name,
        )
        module.on_load_checkpoint(ckpt)
        module.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise WeightsFileError(
            f"{path}: does not rebuild a CausalLM ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); expected {expected}"
        ) from err
    return module.to(map_location).eval(), ckpt
