"""Batch augmentation: the fast crop equals a per-image reference; flip and crop keep the data."""

import torch

from tsbd.train.augment import crop_flip, random_crop, random_hflip


def reference_crop(x, padding, seed):
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def test_random_crop_matches_per_image_slicing():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop(x, 4, torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, reference_crop(x, 4, 3))
    # some images moved (zeros came in from the padding), none is all padding
    assert (out == 0).any() and all((img > 0).any() for img in out)


def test_crop_and_flip_keep_pixels_and_are_seeded():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(random_crop(x, 0), x)
    flipped = random_hflip(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(flipped, x.flip(3))
    assert torch.equal(random_hflip(x, torch.Generator().manual_seed(0), p=0.0), x)
    a = crop_flip(x, torch.Generator().manual_seed(1))
    b = crop_flip(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, crop_flip(x, torch.Generator().manual_seed(2)))
