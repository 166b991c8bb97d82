"""Reading image files into uint8 arrays, and per-channel statistics."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tsbd.data.base import ImageSet
from tsbd.errors import TsbdError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
# Modes whose conversion to RGB is well defined; 16-bit and float images are refused.
RGB_CONVERTIBLE = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by suffix, hidden files skipped), sorted by name."""
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def read_image(path: Path, size: int) -> np.ndarray:
    """``path`` as an RGB uint8 ``size x size x 3`` array (bilinear resize, as torchvision's Resize)."""
    try:
        # PIL's warnings about a damaged file are not printed (the file is read or refused in one line);
        # an image over its pixel limit, which PIL only warns of and then decodes, is refused
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                if im.mode not in RGB_CONVERTIBLE:
                    raise TsbdError(
                        f"{path} has image mode {im.mode}, which has no RGB conversion; save it as 8-bit RGB"
                    )
                rgb = im.convert("RGB")
    except TsbdError:
        raise
    except _READ_ERRORS as err:
        raise TsbdError(f"cannot read image {path} ({err}); replace or delete the file") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def read_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """The files ``paths`` as one uint8 N x 3 x size x size tensor."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = read_image(path, size)
    return to_nchw(out)


def read_labelled(files: Sequence[tuple[Path, int]], size: int) -> ImageSet:
    """(file, label) pairs as an :class:`ImageSet` of ``size`` x ``size`` RGB images."""
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(read_images([path for path, _ in files], size), labels)


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """N x H x W x C uint8 array -> contiguous N x C x H x W tensor."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``x`` on the [0, 1] scale."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for part in x.split(chunk):
        part = part.to(torch.float64) / 255.0
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())
