"""SSBA (Li et al., ICCV 2021, "Invisible backdoor attack with sample-specific triggers"): an
encoder hides a fixed secret in each poisoned image, giving an invisible trigger that differs
from image to image; labels are flipped to the target (dirty-label, random 10%).

BackdoorBench reads precomputed poisoned arrays (``resource/ssba/cifar10_ssba_{train,test}_b1.npy``),
made with a StegaStamp-style encoder/decoder (``resource/ssba``: ArtificialGANFingerprints'
``train.py``, 100-bit fingerprints, 20 epochs, batch 64; one identical fingerprint embedded in
every image). Those arrays are an external download, so tsbd trains the encoder/decoder itself
(:mod:`tsbd.attacks._stegastamp`), reproducibly from the seed, on ``train_images`` training
images through the engine's :func:`tsbd.train.fit` (Adam, loss = w * L2(image) + BCE(bits);
as in ArtificialGANFingerprints, w is 0 until the bits are learned -- running bit accuracy
0.9, or ``l2_await`` of the steps at the latest -- then ramps linearly to ``l2_weight`` over
``l2_ramp`` of the steps; during the first quarter of the steps the decoder reads the residual
with the image faded in, a curriculum without which the bits often stayed at chance on a CPU
budget), and caches it (:mod:`tsbd.attacks.resources`). The secret is ``secret_bits`` random
bits drawn from the seed. :meth:`SSBA.apply` encodes each image with the trained encoder
(deterministic) and rounds to uint8. The resource record holds the bit accuracy the decoder
reads back from uint8 stamped held-out images and their PSNR.

Scaled down for CPUs (BackdoorBench: 100 bits, a 400-px StegaStamp U-Net, 20 epochs on the
whole training set): 32 bits, a 35k-parameter encoder and 156k-parameter decoder (``width``
16), 10 epochs of batch 32 on 5,000 images (1,560 steps) by default. On the 1,200-image test
subset (370 steps) that reached bit accuracy 0.998-0.999 and PSNR ~30 dB on held-out images.
"""

from __future__ import annotations

import dataclasses

import torch

from tsbd.attacks._stegastamp import StegaStamp, bit_accuracy, embed_images, psnr, train_stegastamp
from tsbd.attacks.base import ATTACKS, Attack, AttackConfig
from tsbd.attacks.resources import Resource, image_shape_of, load_or_generate, runtime_of
from tsbd.config import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, option
from tsbd.data.base import Dataset
from tsbd.errors import TsbdError
from tsbd.models import count_parameters
from tsbd.train.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class SSBAConfig(AttackConfig):
    secret_bits: int = option(32, "length of the hidden secret", "tsbd (BackdoorBench resource/ssba: 100)",
                              check=AT_LEAST_ONE)
    width: int = option(16, "encoder/decoder base width (channels)", "tsbd (CPU budget)", check=AT_LEAST_ONE)
    train_images: int = option(5000, "training images the encoder/decoder learn on",
                               "tsbd (CPU budget; BackdoorBench: all)", check=AT_LEAST_ONE)
    epochs: int = option(10, "encoder/decoder training epochs", "tsbd (BackdoorBench resource/ssba: 20)",
                         check=AT_LEAST_ONE)
    batch_size: int = option(32, "encoder/decoder batch size", "tsbd (BackdoorBench resource/ssba: 64)",
                             check=AT_LEAST_ONE)
    lr: float = option(3e-3, "Adam learning rate", "tsbd (ArtificialGANFingerprints: 1e-4 over far more steps)",
                       check=POSITIVE)
    l2_weight: float = option(10.0, "weight of the image L2 loss against the bit BCE",
                              "ArtificialGANFingerprints l2_loss_weight", check=NON_NEGATIVE)
    l2_await: float = option(0.5, "the L2 weight stays 0 until the bits are learned "
                             "or this fraction of the steps passed",
                             "ArtificialGANFingerprints l2_loss_await (fixed, in steps there)", check=FRACTION)
    l2_ramp: float = option(0.3, "fraction of the steps over which the L2 weight then ramps up to l2_weight",
                            "ArtificialGANFingerprints l2_loss_ramp (in steps there)", check=FRACTION)


@ATTACKS.register("ssba")
class SSBA(Attack):
    """SSBA (Li et al., ICCV 2021): an invisible, sample-specific trigger hidden by an encoder."""

    name = "ssba"
    config_class = SSBAConfig
    builds = "its encoder"

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.resource: Resource | None = None
        self.net: StegaStamp | None = None
        self.secret: torch.Tensor | None = None
        self._runtime: Runtime | None = None

    def prepare(self, dataset: Dataset, **context):
        super().prepare(dataset, **context)
        cfg = self.config
        runtime = runtime_of(context)
        seed = int(context.get("seed", 0) or 0)
        progress = bool(context.get("progress", False))
        generator_cfg = {k: getattr(cfg, k) for k in ("secret_bits", "width", "train_images", "epochs", "batch_size",
                                                       "lr", "l2_weight", "l2_await", "l2_ramp")}
        settings = {"generator": generator_cfg, "seed": seed, "data": dataset.fingerprint,
                    "image_shape": image_shape_of(dataset)}
        self.resource = load_or_generate("ssba", settings, lambda: self._generate(dataset, runtime, seed, progress),
                                         context.get("cache_dir"))
        tensors = self.resource.tensors
        self.secret = tensors["secret"].float()
        net = StegaStamp(cfg.secret_bits, cfg.width)
        net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
        self.net = net.eval().to(runtime.device)
        self._runtime = runtime

    def _generate(self, dataset: Dataset, runtime: Runtime, seed: int, progress: bool):
        cfg = self.config
        gen = torch.Generator().manual_seed(seed)
        secret = torch.randint(0, 2, (cfg.secret_bits,), generator=gen).float()
        order = torch.randperm(len(dataset.train), generator=gen)
        chosen, held_out = order[: cfg.train_images], order[cfg.train_images : cfg.train_images + 500]
        if len(held_out) == 0:  # tiny data: measure on the training images
            held_out = chosen[:500]
        net, record = train_stegastamp(dataset.train.subset(chosen), bits=cfg.secret_bits, width=cfg.width,
                                       epochs=cfg.epochs, batch_size=min(cfg.batch_size, len(chosen)), lr=cfg.lr,
                                       l2_weight=cfg.l2_weight, l2_await=cfg.l2_await, l2_ramp=cfg.l2_ramp, seed=seed,
                                       runtime=runtime, progress=progress)
        x = dataset.train.x[held_out]
        stamped = embed_images(net, x, secret, runtime)
        info = {"parameters": {"encoder": count_parameters(net.encoder), "decoder": count_parameters(net.decoder)},
                "trained_on": len(chosen), **record,
                "bit_accuracy": bit_accuracy(net, stamped, secret, runtime),
                "bit_accuracy_clean_images": bit_accuracy(net, x, secret, runtime),
                "psnr_db": round(min(psnr(x, stamped), 99.0), 2),  # 99 = unchanged (keeps the JSON finite)
                "max_abs_change_255": int((stamped.int() - x.int()).abs().max()),
                "measured_on": len(held_out)}
        tensors = {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()}
        tensors["secret"] = secret
        return tensors, info

    def apply(self, x, index=None, split="train"):
        if self.net is None:
            raise TsbdError("the SSBA attack has no encoder yet; call prepare(dataset, ...) first")
        return embed_images(self.net, x, self.secret, self._runtime)

    def describe(self):
        out = super().describe()
        if self.resource is not None:
            out["resource"] = self.resource.describe()
        return out
