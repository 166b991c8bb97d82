"""Drawing an attack's poisoned test images beside the clean ones, with the residual and its
statistics (mean L-inf, L2, PSNR). The ``tsbd show-attack`` command (:mod:`tsbd.cli.show`) calls it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from tsbd.artifacts import pyplot, save_figure
from tsbd.errors import TsbdError

FORMATS = ("png", "svg")  # OUT/NAME.png and OUT/NAME.svg


def residual_stats(clean: torch.Tensor, poisoned: torch.Tensor) -> dict[str, float]:
    """Mean per-image L-inf and L2 of the residual (on the [0, 1] scale) and PSNR in dB."""
    if clean.shape != poisoned.shape:
        raise TsbdError(f"clean {tuple(clean.shape)} and poisoned {tuple(poisoned.shape)} images differ in shape")
    diff = (poisoned.float() - clean.float()).flatten(1) / 255.0
    mse = diff.pow(2).mean(1)
    psnr = torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-12)), torch.full_like(mse, math.inf))
    finite = psnr[torch.isfinite(psnr)]
    return {
        "linf": float(diff.abs().amax(1).mean()),
        "l2": float(diff.norm(dim=1).mean()),
        "psnr_db": float(finite.mean()) if len(finite) else math.inf,
        "changed_fraction": float((diff.abs().amax(1) > 0).float().mean()),
    }


def pick_images(labels: torch.Tensor, target: int, count: int, seed: int) -> torch.Tensor:
    """``count`` non-target test indices, one class after another where possible (seeded)."""
    g = torch.Generator().manual_seed(seed)
    picked: list[int] = []
    classes = [int(c) for c in torch.unique(labels) if int(c) != target]
    pools = {c: torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=g)].tolist()
             for c in classes}
    while len(picked) < count and any(pools.values()):
        for c in classes:
            if pools[c] and len(picked) < count:
                picked.append(pools[c].pop(0))
    return torch.tensor(picked, dtype=torch.int64)


def show_attack(attack, dataset, runtime, *, out: str | Path, images: int = 8, seed: int = 0,
                arch: str = "airbench", arch_kwargs: dict | None = None, cache_dir: str | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Draw ``attack``'s poisoned examples on ``dataset``'s test split into ``out``/NAME.png/.svg."""
    plt = pyplot()
    if images < 1:
        raise TsbdError(f"--images must be at least 1, got {images}")
    attack.prepare(dataset, runtime=runtime, seed=seed, arch=arch, arch_kwargs=arch_kwargs or {},
                   cache_dir=cache_dir, progress=progress)
    test = dataset.test
    keep = torch.nonzero(test.y != attack.config.target).flatten()
    poisoned_all = attack.apply_chunked(test.x[keep], keep, "test")
    stats = residual_stats(test.x[keep], poisoned_all)
    chosen = pick_images(test.y[keep], attack.config.target, images, seed)
    clean, poisoned = test.x[keep][chosen], poisoned_all[chosen]
    residual = (poisoned.float() - clean.float()).abs()
    scale = float(residual.max()) or 1.0

    n = len(chosen)
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n + 1.2, 4.4), squeeze=False)
    classes = dataset.classes
    for j in range(n):
        label = int(test.y[keep][chosen[j]])
        panels = [clean[j], poisoned[j], (residual[j] / scale * 255).round().to(torch.uint8)]
        for i, img in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(classes[label] if label < len(classes) else str(label), fontsize=8)
    target = attack.config.target
    row_names = ["clean", f"poisoned\n(-> {classes[target] if target < len(classes) else target})",
                 f"|residual|\nx{255 / scale:.1f}"]
    for i, name in enumerate(row_names):
        axes[i][0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"{attack.name} on {dataset.name}: L-inf {stats['linf'] * 255:.1f}/255, "
                 f"PSNR {stats['psnr_db']:.1f} dB (mean over {len(keep)} test images)", fontsize=9)
    path = Path(out) / attack.name
    save_figure(fig, path, formats=FORMATS, dpi=120)
    plt.close(fig)
    return {"attack": attack.describe(), "dataset": dataset.name, "images": [int(keep[c]) for c in chosen],
            "residual": stats, "png": str(path.with_suffix(".png")), "svg": str(path.with_suffix(".svg"))}
