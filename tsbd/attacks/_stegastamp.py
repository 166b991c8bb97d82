"""A small StegaStamp-style encoder/decoder for SSBA's sample-specific triggers.

After StegaStamp (Tancik et al., CVPR 2020) as SSBA's authors and BackdoorBench's
``resource/ssba`` scripts use it (the latter via ArtificialGANFingerprints' ``train.py``:
secret -> dense -> 3-channel map upsampled to the image, concatenated with the image, a
U-Net, loss = w * L2(image) + BCE(bits)), scaled down to train on CPU:

* encoder: secret (``bits``) -> Linear -> 3 x 8 x 8 map, nearest-upsampled to H x W and
  concatenated with the image (centred at 0); two 3x3 convs at full resolution (``width``),
  two at half resolution (2 * ``width``), bilinear upsampling, a skip connection, two 3x3
  convs, and a last 3x3 conv to 3 channels whose initial weights are scaled up 3x. Its output
  is the residual added to the image (x' = clip(x + r)).
* decoder: four 3x3 conv + batch norm + ReLU blocks (three with stride 2), adaptive average
  pool to 4 x 4, two linear layers -> one logit per bit. The decoder is only a training aid
  and is never used to poison.

Training starts with the bits at chance. With a plain start (small residual weights, no batch
norm in the decoder, image loss from step 0) that plateau outlasted the whole CPU budget in
most runs tried, and the image loss then shrank the residual to nothing. Three measures end it
within ~100 steps in every run tried (4 seeds each at 16 bits / 192 steps and 32 bits / 370
steps): the residual weights start 3x larger, the decoder has batch norm, and a curriculum
first shows the decoder the residual alone (see :meth:`StegaStamp.training_step`); the image
loss, held back until the bits are learned, then brings the residual to ~27-38 dB PSNR.

The encoder has no batch norm, so embedding is a fixed function of (image, secret).
Training draws a fresh random secret for every image (as StegaStamp does), so the encoder
learns to hide any secret and the decoder to read it; the backdoor then embeds one fixed
secret in every poisoned image.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from tsbd.data.base import ImageSet
from tsbd.train.engine import TrainConfig, fit, to_model_input
from tsbd.train.runtime import Runtime

SECRET_SIDE = 8  # the secret's dense map is 3 x 8 x 8 before upsampling (StegaStamp: 3 x 50 x 50 for 400 px)
INIT_RESIDUAL_SCALE = 3.0  # a loud start: measured to end the bits-at-chance plateau within ~100 steps
CURRICULUM = 0.25  # fraction of the steps over which the decoder's input goes from the residual to x'
BITS_LEARNED = 0.9  # running training bit accuracy at which the image loss starts ramping up
EMBED_BATCH = 256  # images encoded per forward pass when poisoning


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


class StegaStampEncoder(nn.Module):
    """(image in [0, 1], secret bits in {0, 1}) -> residual image of the same shape."""

    def __init__(self, bits: int, width: int = 32):
        super().__init__()
        self.secret_dense = nn.Linear(bits, 3 * SECRET_SIDE * SECRET_SIDE)
        self.inc1, self.inc2 = _conv(6, width), _conv(width, width)
        self.down1, self.down2 = _conv(width, 2 * width, stride=2), _conv(2 * width, 2 * width)
        self.up = _conv(2 * width, width)
        self.merge1, self.merge2 = _conv(2 * width, width), _conv(width, width)
        self.residual = _conv(width, 3)
        with torch.no_grad():
            self.residual.weight.mul_(INIT_RESIDUAL_SCALE)

    def forward(self, x: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        s = self.secret_dense(secret).view(-1, 3, SECRET_SIDE, SECRET_SIDE)
        s = F.interpolate(s, size=x.shape[-2:], mode="nearest")
        h = F.relu(self.inc2(F.relu(self.inc1(torch.cat([x - 0.5, s], 1)))))
        d = F.relu(self.down2(F.relu(self.down1(h))))
        u = F.relu(self.up(F.interpolate(d, size=h.shape[-2:], mode="bilinear", align_corners=False)))
        m = F.relu(self.merge2(F.relu(self.merge1(torch.cat([h, u], 1)))))
        return self.residual(m)


class StegaStampDecoder(nn.Module):
    """Image in [0, 1] -> one logit per secret bit."""

    def __init__(self, bits: int, width: int = 32):
        super().__init__()
        def block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [_conv(c_in, c_out, stride), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, width), *block(width, width, 2), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(2 * width * 16, 256), nn.ReLU(), nn.Linear(256, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5))


class StegaStamp(nn.Module):
    """Encoder and decoder trained together (one module, so :func:`fit` trains both)."""

    def __init__(self, bits: int, width: int = 32):
        super().__init__()
        self.bits = bits
        self.encoder = StegaStampEncoder(bits, width)
        self.decoder = StegaStampDecoder(bits, width)

    def embed(self, x: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] with ``secret`` (one row per image, or one row for all) hidden in them."""
        if secret.ndim == 1:
            secret = secret.expand(len(x), -1)
        return (x + self.encoder(x, secret.to(x.dtype))).clamp(0, 1)

    def training_step(self, l2_weight: float, warmup_steps: int, await_steps: int, ramp_steps: int, seed: int):
        """A :func:`tsbd.train.fit` step: random secrets, loss = w * MSE(image) + BCE(bits).

        Two schedules make the start reliable (without them the bits often stayed at chance
        for the whole CPU budget):

        * curriculum: for the first ``warmup_steps`` steps the decoder reads x' - a x instead
          of x', with a falling linearly from 1 to 0 -- it first learns to read the residual
          alone, then with more and more of the image around it; afterwards it reads x' only;
        * image loss, as ArtificialGANFingerprints' l2_loss_await/l2_loss_ramp: w is 0 until
          the bits are learned on x' (running training bit accuracy :data:`BITS_LEARNED`, or
          ``await_steps`` steps at the latest), then grows linearly to ``l2_weight`` over
          ``ramp_steps`` steps. An image loss applied before the bits are learned drives the
          residual to zero for good.
        """
        gen = torch.Generator().manual_seed(seed)
        state = {"step": 0, "start": None, "bit_accuracy": 0.5}

        def step(model: StegaStamp, x, y, optimizer, runtime):
            secret = torch.randint(0, 2, (len(x), model.bits), generator=gen).float().to(x.device)
            now = state["step"]
            alpha = max(0.0, 1.0 - now / warmup_steps) if warmup_steps > 0 else 0.0
            with runtime.autocast():
                stamped = model.embed(x, secret)
                logits = model.decoder(stamped - alpha * x if alpha > 0 else stamped)
            if state["start"] is None and alpha == 0:
                acc = float(((logits.detach() > 0).float() == secret).float().mean())
                state["bit_accuracy"] = 0.9 * state["bit_accuracy"] + 0.1 * acc
                if state["bit_accuracy"] >= BITS_LEARNED:
                    state["start"] = now
            if state["start"] is None and now >= await_steps:
                state["start"] = now
            ramp = 0.0 if state["start"] is None else min(1.0, (now - state["start"]) / max(1, ramp_steps))
            state["step"] += 1
            loss = (l2_weight * ramp * F.mse_loss(stamped.float(), x)
                    + F.binary_cross_entropy_with_logits(logits.float(), secret))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

        step.state = state  # when the image loss started, for the record
        return step


def train_stegastamp(images: ImageSet, *, bits: int, width: int, epochs: int, batch_size: int, lr: float,
                     l2_weight: float, l2_await: float, l2_ramp: float, seed: int, runtime: Runtime,
                     progress: bool = False) -> tuple[StegaStamp, dict]:
    """Train a :class:`StegaStamp` on ``images`` through the engine's :func:`fit` (Adam, constant lr);
    returns it in eval mode and a record of the training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = StegaStamp(bits, width)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.0, weight_decay=0.0,
                      schedule="constant", augment=False, drop_last=len(images) >= batch_size)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * (len(images) // batch_size if cfg.drop_last else math.ceil(len(images) / batch_size))
    step = net.training_step(l2_weight, int(CURRICULUM * steps), int(l2_await * steps), int(l2_ramp * steps), seed)
    result = fit(net, images, cfg, runtime, seed=seed, step=step, optimizer=optimizer,
                 desc="SSBA encoder/decoder", progress=progress)
    record = {"epochs": result.epochs, "steps": steps, "l2_start_step": step.state["start"],
              "seconds_training": round(result.seconds, 2),
              "final_loss": result.history[-1]["loss"] if result.history else None}
    return net.eval(), record


@torch.no_grad()
def embed_images(net: StegaStamp, x_uint8: torch.Tensor, secret: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """uint8 images with ``secret`` embedded, rounded back to uint8 (what the victim trains on)."""
    net.eval().to(runtime.device)
    out = []
    for start in range(0, len(x_uint8), EMBED_BATCH):
        xb = to_model_input(x_uint8[start : start + EMBED_BATCH], runtime).contiguous()
        stamped = net.embed(xb, secret.to(runtime.device))
        out.append(stamped.float().mul_(255).round_().clamp_(0, 255).to(torch.uint8).cpu())
    return torch.cat(out) if out else x_uint8.clone()


@torch.no_grad()
def bit_accuracy(net: StegaStamp, x_uint8: torch.Tensor, secret: torch.Tensor, runtime: Runtime) -> float:
    """Fraction of the secret's bits the decoder reads back from uint8 stamped images."""
    net.eval().to(runtime.device)
    hits, total = 0.0, 0
    for start in range(0, len(x_uint8), EMBED_BATCH):
        logits = net.decoder(to_model_input(x_uint8[start : start + EMBED_BATCH], runtime).contiguous())
        hits += float(((logits > 0).float().cpu() == secret.view(1, -1)).float().sum())
        total += logits.numel()
    return hits / max(1, total)


def psnr(a_uint8: torch.Tensor, b_uint8: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 image batches (inf when identical)."""
    mse = float((a_uint8.float() - b_uint8.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
