"""A CPU-scale airbench-style net: frozen patch whitening, three conv groups, scaled logits.

After Keller Jordan's airbench (github.com/KellerJordan/cifar10-airbench, ``airbench94.py``;
"94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv:2404.00498), narrowed from its widths
64-256-256 to 32-64-128 so that it trains on 2 CPU cores in minutes (0.30M parameters; measured
speeds in BENCHMARKS.md, "Engine speed"):

* ``whiten``: 2x2 conv, 3 -> 24 channels, no padding. Its weights are frozen
  (``requires_grad=False``) and set by :meth:`Airbench.init_from_data` to the eigenbasis of
  the 2x2x3 patch covariance scaled by ``1/sqrt(eigenvalue + eps)``, each filter also
  negated (12 + 12 channels); its bias trains. Until that call the weights are the same
  construction for an identity covariance, so the model works (less well) without data.
* GELU, then three :class:`ConvGroup` of [conv3x3, maxpool2, BN, GELU, conv3x3, BN, GELU]
  with ``widths`` (32, 64, 128), global max pool, bias-free linear, logits times 1/8.

Differences from airbench94, for a plain model that defenses can walk: BatchNorm is plain
``nn.BatchNorm2d`` with trainable affine weights and default eps/momentum (airbench freezes
the BN scale and uses momentum 0.6, eps 1e-12), and the head pools globally
(``AdaptiveMaxPool2d(1)``) instead of ``MaxPool2d(3)`` so any input size works. Like
airbench, each 3x3 conv's first ``in_channels`` filters start as identity (dirac) filters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from tsbd.errors import TsbdError
from tsbd.models import MODELS
from tsbd.models.normalize import Normalize

log = logging.getLogger(__name__)

WHITEN_KERNEL = 2  # airbench94: 2x2 patches
WHITEN_EPS = 5e-4  # airbench94 init_whitening_conv eps
WHITEN_MAX_IMAGES = 5000  # airbench94 whitens on the first 5000 training images
LOGIT_SCALE = 1 / 8  # airbench94.py scales its logits by a constant too (hyp['net']['scaling_factor'] = 1/9)


class ConvGroup(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU (airbench94 ConvGroup)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


def _whitening_filters(cov: torch.Tensor, channels: int, eps: float) -> torch.Tensor:
    """Filters ``[V / sqrt(l + eps); -V / sqrt(l + eps)]`` from the eigendecomposition of
    the patch covariance ``cov`` (largest eigenvalue first), shaped as conv weights."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    basis = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]
    basis = basis.reshape(-1, channels, WHITEN_KERNEL, WHITEN_KERNEL)
    return torch.cat([basis, -basis])


class Airbench(nn.Module):
    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        widths: Sequence[int] = (32, 64, 128),
    ):
        super().__init__()
        patch_dim = 3 * WHITEN_KERNEL * WHITEN_KERNEL
        self.normalize = Normalize(mean, std)
        self.whiten = nn.Conv2d(3, 2 * patch_dim, kernel_size=WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.activ = nn.GELU()
        channels = [2 * patch_dim, *widths]
        self.groups = nn.Sequential(*[ConvGroup(c_in, c_out) for c_in, c_out in zip(channels, channels[1:])])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self._reset_whitening(torch.eye(patch_dim, dtype=torch.float64))
        nn.init.zeros_(self.whiten.bias)
        with torch.no_grad():
            for m in self.groups.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.dirac_(m.weight[: m.weight.size(1)])

    @torch.no_grad()
    def _reset_whitening(self, cov: torch.Tensor, eps: float = WHITEN_EPS) -> None:
        filters = _whitening_filters(cov, 3, eps)
        self.whiten.weight.copy_(filters.to(self.whiten.weight))

    @torch.no_grad()
    def init_from_data(
        self, images: torch.Tensor, max_images: int = WHITEN_MAX_IMAGES, eps: float = WHITEN_EPS
    ) -> None:
        """Set the frozen whitening filters from uint8 training images (N x 3 x H x W).

        Uses the first ``max_images`` images, normalized as the model normalizes its input,
        and the (uncentered, as in airbench) covariance of all their 2x2x3 patches.
        """
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise TsbdError(f"init_from_data needs uint8 images N x 3 x H x W, got {got}; pass ImageSet.x")
        if images.shape[1] != 3 or images.shape[0] == 0 or min(images.shape[2:]) < WHITEN_KERNEL:
            raise TsbdError(
                f"init_from_data needs at least one 3-channel image of {WHITEN_KERNEL}x{WHITEN_KERNEL} "
                f"pixels or more, got shape {tuple(images.shape)}"
            )
        images = images[:max_images]
        device = self.whiten.weight.device
        patch_dim = 3 * WHITEN_KERNEL * WHITEN_KERNEL
        cov = torch.zeros(patch_dim, patch_dim, dtype=torch.float64, device=device)
        count = 0
        for start in range(0, len(images), 500):  # chunks keep the patch matrix small on CPU
            x = self.normalize(images[start : start + 500].to(device=device, dtype=torch.float32) / 255)
            patches = x.unfold(2, WHITEN_KERNEL, 1).unfold(3, WHITEN_KERNEL, 1)  # N,C,H',W',k,k
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, patch_dim).double()
            cov += patches.T @ patches
            count += patches.shape[0]
        cov /= count
        self._reset_whitening(cov, eps)
        log.debug("whitening set from %d images (%d patches)", len(images), count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.whiten(self.normalize(x)))
        x = self.groups(x)
        x = torch.flatten(self.pool(x), 1)
        return self.head(x) * LOGIT_SCALE


@MODELS.register("airbench")
def airbench(
    num_classes: int, *, mean: Sequence[float], std: Sequence[float], widths: Sequence[int] = (32, 64, 128)
) -> Airbench:
    """Airbench-style net; ``widths`` of the three conv groups (default 32, 64, 128; airbench94: 64, 256, 256)."""
    ok = (
        isinstance(widths, (list, tuple))
        and len(widths) == 3
        and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
    )
    if not ok:
        raise TsbdError(f"airbench widths must be three positive integers, got {widths!r}; "
                        "the default is [32, 64, 128]")
    return Airbench(num_classes, mean, std, widths=tuple(widths))
