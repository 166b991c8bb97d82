"""The JPEG-archive format: one ``.npz`` holding every image's JPEG bytes back to back.

Arrays (see the data README): ``train_jpeg``/``test_jpeg`` (uint8), ``train_offsets``/
``test_offsets`` (int64, N+1; image i is ``jpeg[offsets[i]:offsets[i+1]]``),
``train_labels``/``test_labels`` (class indices) and ``classes`` (names). Extra arrays are
allowed and ignored. The file is opened with ``allow_pickle=False``: nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from tsbd.data.base import Dataset, ImageSet
from tsbd.data.cache import Splits, hash_file, load_or_decode
from tsbd.data.images import to_nchw
from tsbd.errors import TsbdError

SPLITS = ("train", "test")
ARCHIVE_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("jpeg", "offsets", "labels")) + ("classes",)
_REBUILD = "re-copy or rebuild the archive"


@dataclasses.dataclass
class JpegArchive:
    """The validated, still-encoded contents of a JPEG archive."""

    path: Path
    jpeg: dict[str, np.ndarray]  # split -> uint8 bytes
    offsets: dict[str, np.ndarray]  # split -> int64, N + 1
    labels: dict[str, np.ndarray]  # split -> int64, N
    classes: list[str]

    def image_bytes(self, split: str, i: int) -> bytes:
        off = self.offsets[split]
        return self.jpeg[split][off[i] : off[i + 1]].tobytes()


def open_jpeg_archive(path: Path, num_classes: int | None = None) -> JpegArchive:
    """Read and check an archive's arrays without decoding the images."""
    try:
        # Our own file handle: np.load leaks its handle when the zip directory is unreadable.
        with open(path, "rb") as fh:
            npz = np.load(fh, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise TsbdError(f"{path} is a single .npy array, not a JPEG archive (.npz); {_REBUILD}")
            with npz:
                missing = [k for k in ARCHIVE_KEYS if k not in npz.files]
                if missing:
                    raise TsbdError(
                        f"{path} lacks the array(s) {', '.join(missing)}; a JPEG archive needs "
                        f"{', '.join(ARCHIVE_KEYS)}; {_REBUILD}"
                    )
                arrays = {k: npz[k] for k in ARCHIVE_KEYS}
    except TsbdError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise TsbdError(f"cannot read {path}: it is corrupt or truncated ({err}); {_REBUILD}") from None

    classes = arrays["classes"]
    if classes.ndim != 1 or classes.dtype.kind not in "US" or len(classes) == 0:
        raise TsbdError(f"{path}: 'classes' must be a non-empty 1-D string array; {_REBUILD}")
    names = [c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist()]
    if num_classes is not None and len(names) != num_classes:
        raise TsbdError(
            f"{path} has {len(names)} classes, expected {num_classes}; is it the right dataset's archive?"
        )
    archive = JpegArchive(path, {}, {}, {}, names)
    for split in SPLITS:
        jpeg, off, lab = (arrays[f"{split}_{k}"] for k in ("jpeg", "offsets", "labels"))
        if jpeg.ndim != 1 or jpeg.dtype != np.uint8:
            raise TsbdError(f"{path}: {split}_jpeg must be 1-D uint8, got {jpeg.dtype} {jpeg.shape}; {_REBUILD}")
        if off.ndim != 1 or off.dtype.kind not in "iu" or lab.ndim != 1 or lab.dtype.kind not in "iu":
            raise TsbdError(f"{path}: {split}_offsets and {split}_labels must be 1-D integer arrays; {_REBUILD}")
        if len(lab) == 0:
            raise TsbdError(f"the {split} split of {path} is empty; {_REBUILD}")
        off = off.astype(np.int64)
        if len(off) != len(lab) + 1 or off[0] != 0 or off[-1] != len(jpeg) or np.any(np.diff(off) <= 0):
            raise TsbdError(
                f"{path}: {split}_offsets do not cut {split}_jpeg into {len(lab)} images "
                f"(need N+1 increasing offsets from 0 to {len(jpeg)}); {_REBUILD}"
            )
        lab = lab.astype(np.int64)
        bad = lab[(lab < 0) | (lab >= len(names))]
        if len(bad):
            raise TsbdError(
                f"{path}: {split} label {int(bad[0])} is out of range for {len(names)} classes; {_REBUILD}"
            )
        archive.jpeg[split], archive.offsets[split], archive.labels[split] = jpeg, off, lab
    return archive


def decode_split(archive: JpegArchive, split: str, image_size: tuple[int, int] | None = None) -> ImageSet:
    """Decode one split's JPEGs with Pillow; every image must be RGB of one size (``image_size`` if given)."""
    jpeg, off = archive.jpeg[split], archive.offsets[split].tolist()
    view = memoryview(jpeg)
    n = len(off) - 1
    out: np.ndarray | None = None
    for i in range(n):
        try:
            # The JPEG plugin directly: 20% faster than Image.open's format probing, and mode
            # and size are checked from the header before any pixel is decoded.
            with JpegImageFile(io.BytesIO(view[off[i] : off[i + 1]])) as im:
                if im.mode != "RGB":
                    raise TsbdError(
                        f"{archive.path}: {split} image {i} has mode {im.mode}, expected RGB; {_REBUILD}"
                    )
                if out is None:
                    width, height = image_size or im.size
                    out = np.empty((n, height, width, 3), dtype=np.uint8)
                if im.size != (out.shape[2], out.shape[1]):
                    raise TsbdError(
                        f"{archive.path}: {split} image {i} is {im.size[0]}x{im.size[1]}, expected "
                        f"{out.shape[2]}x{out.shape[1]}; {_REBUILD}"
                    )
                im.load()
                out[i] = np.asarray(im)
        except TsbdError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise TsbdError(
                f"{archive.path}: {split} image {i} is not a readable image ({err}); {_REBUILD}"
            ) from None
    assert out is not None  # open_jpeg_archive refuses empty splits
    return ImageSet(to_nchw(out), archive.labels[split])


def load_archive_dataset(
    name: str,
    path: Path,
    *,
    num_classes: int,
    image_size: tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    cache_dir: Path,
) -> Dataset:
    """A :class:`Dataset` from a JPEG archive, decoded once and then read from the cache."""

    def decode() -> Splits:
        archive = open_jpeg_archive(path, num_classes)
        return Splits(*(decode_split(archive, s, image_size) for s in SPLITS), archive.classes)

    splits, fingerprint = load_or_decode(
        name, {"kind": "jpeg-archive", "sha256": hash_file(path)}, decode, cache_dir, str(path)
    )
    return Dataset(name, splits.train, splits.test, splits.classes, mean, std, fingerprint, str(path))


def write_jpeg_archive(
    path: Path,
    train: tuple[Sequence[bytes], Sequence[int]],
    test: tuple[Sequence[bytes], Sequence[int]],
    classes: Sequence[str],
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write (JPEG bytes, labels) per split as an archive ``np.load`` reads.

    Stored uncompressed (JPEG does not compress further) with fixed zip timestamps, so the
    same inputs give the same bytes.
    """
    arrays: dict[str, np.ndarray] = {}
    label_dtype = np.uint8 if len(classes) <= 256 else np.int64
    for split, (images, labels) in zip(SPLITS, (train, test)):
        lengths = np.array([len(b) for b in images], dtype=np.int64)
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(images), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=label_dtype)
    arrays["classes"] = np.array([str(c) for c in classes])
    arrays.update(extra or {})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)
