"""Data pipeline: image folders decoded once into cached uint8 tensors, subsets, splits,
loaders, evaluation transforms and SMOTE. Whole data sets of any layout (split folders, class
folders, a CSV) are loaded by :mod:`kdkit.image_data`.

Images are decoded a single time at the training resolution and kept in memory as a uint8
``N x 3 x H x W`` tensor (and on disk in a cache): on a 2-core machine, decoding JPEGs every
epoch would dominate training time, whereas the per-item transforms on small uint8 tensors
are cheap.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from sklearn.model_selection import train_test_split
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ._progress import progress_bar
from .checkpoint import atomic_write, clean_stale_temporaries
from .fingerprint import tensor_digest

__all__ = [
    "CACHE_DIR_ENV",
    "CorruptImageError",
    "ImageTensorDataset",
    "SplitError",
    "balanced_subset_indices",
    "batches_per_process",
    "eval_transforms",
    "load_imagefolder",
    "make_loader",
    "per_process_batch_size",
    "smote_balance",
    "stratified_split_indices",
]

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "KDKIT_CACHE_DIR"

OnCorrupt = Literal["error", "skip"]

# Split names looked for by ``load_imagefolder`` when no splits are given (case-insensitive).
_SPLIT_FOLDER_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
# Bump when decoding changes so that stale caches are not reused. 2: images of more than 8 bits
# (16-bit, 32-bit integer and float) are scaled by their range instead of clipped or truncated;
# caches of version 1 whose files all decode as before are renamed, not decoded again
# (_cache_file).
_CACHE_FORMAT_VERSION = 2
# Temporary files of decoded-image caches (atomic_write's): cleaned at each use.
_CACHE_TEMPORARIES = ".*.pt.*.tmp"


class CorruptImageError(ValueError):
    """An image file that exists but cannot be decoded (truncated, corrupt or not an image)."""


class SplitError(ValueError):
    """A stratified split that the data cannot give: too few images, or a class of one image."""


# --------------------------------------------------------------------------- locations


def _resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env_cache := os.environ.get(CACHE_DIR_ENV):
        return Path(env_cache).expanduser()
    return Path.home() / ".cache" / "kdkit"


# --------------------------------------------------------------------------- dataset


class ImageTensorDataset(Dataset):
    """Images pre-decoded into one uint8 tensor, with labels and an optional per-item transform.

    Subsets made by :meth:`subset` and copies made by :meth:`with_transform` and
    :meth:`as_uint8` share the underlying image storage, so carving train/validation splits
    costs no image memory.

    Items are float32 in [0, 1] (or whatever the transform returns), except in a view made by
    :meth:`as_uint8`, whose items are the stored uint8 images, for augmentation of whole
    batches on the device (:mod:`kdkit.augment`).

    Attributes:
        labels: int64 tensor of shape ``(N,)``.
        classes: Class names; ``labels`` index into this list.
        transform: Called on each uint8 ``3 x H x W`` image in ``__getitem__``, or None.
        paths: Source file of each item (for error analysis), or None.
        skipped: Files left out at load time because they could not be decoded.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | Sequence[int],
        classes: Sequence[str],
        transform: Callable[[Tensor], Tensor] | None = None,
        *,
        paths: Sequence[str] | None = None,
        skipped: Sequence[str] = (),
    ) -> None:
        """Create the dataset.

        Args:
            images: uint8 tensor ``N x 3 x H x W``, already at the training resolution.
            labels: ``N`` class indices into ``classes``.
            classes: Class names.
            transform: Optional per-item transform on the uint8 image tensor.
            paths: Optional source file of each image.
            skipped: Paths of files that could not be decoded and were left out.

        Raises:
            ValueError: Wrong dtype or shape, mismatched lengths or out-of-range labels.
        """
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a uint8 N x 3 x H x W tensor, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{len(images)} images but labels of shape {tuple(labels.shape)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(f"labels must lie in [0, {len(classes)}) for {len(classes)} classes")
        if paths is not None and len(paths) != len(labels):
            raise ValueError(f"{len(labels)} images but {len(paths)} paths")
        self._storage = images
        # Row of ``_storage`` for each item, or None when the dataset uses every row in order.
        self._rows: Tensor | None = None
        self.labels = labels
        self.classes = list(classes)
        self.transform = transform
        self.paths = None if paths is None else list(paths)
        self.skipped = list(skipped)
        # Set by as_uint8: items keep the stored dtype instead of becoming float32.
        self._keep_uint8 = False

    @property
    def images(self) -> Tensor:
        """uint8 ``N x 3 x H x W`` images; for a subset this gathers its rows into a new tensor."""
        return self._storage if self._rows is None else self._storage[self._rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        row = index if self._rows is None else int(self._rows[index])
        image = self._storage[row]
        if self.transform is not None:
            image = self.transform(image)
        if not image.is_floating_point() and not self._keep_uint8:
            image = v2.functional.to_dtype(image, torch.float32, scale=True)
        return image, int(self.labels[index])

    @property
    def yields_uint8(self) -> bool:
        """True for a view made by :meth:`as_uint8`: items are not converted to float."""
        return self._keep_uint8

    def subset(self, indices: Sequence[int] | np.ndarray | Tensor) -> ImageTensorDataset:
        """Return the items at ``indices`` (positions in this dataset), sharing image storage."""
        positions = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        subset = copy.copy(self)
        subset._rows = positions if self._rows is None else self._rows[positions]
        subset.labels = self.labels[positions]
        if self.paths is not None:
            subset.paths = [self.paths[position] for position in positions.tolist()]
        return subset

    def with_transform(self, transform: Callable[[Tensor], Tensor] | None) -> ImageTensorDataset:
        """Return a view of this dataset with another transform, sharing image storage.

        The view yields float32 items again (a transform's float output is returned as is, a
        uint8 one converted to float in [0, 1]), also when this dataset is an :meth:`as_uint8`
        view.
        """
        view = copy.copy(self)
        view.transform = transform
        view._keep_uint8 = False
        return view

    def as_uint8(self) -> ImageTensorDataset:
        """Return a view without a transform whose items are the stored uint8 ``3 x H x W`` images.

        The view shares the image storage, and each item is a view of that storage (the
        DataLoader's collation copies it into the batch), so do not modify items in place.
        Batches of it are uint8, a quarter of the bytes of float32 to copy to an accelerator,
        where a :class:`kdkit.augment.BatchTransform` (such as
        :func:`kdkit.augment.batch_eval_transforms`) augments, converts and normalises them.
        :meth:`subset` keeps the uint8 items; :meth:`with_transform` returns to float ones.
        """
        view = copy.copy(self)
        view.transform = None
        view._keep_uint8 = True
        return view

    def fingerprint(self) -> dict[str, object]:
        """What this dataset holds, for :func:`kdkit.fingerprint.dataset_fingerprint`: its size,
        image shape, classes, label range and a digest of its images (rows) and labels.

        The stored images are hashed once per process however many subsets share them.
        """
        digest = hashlib.sha256(tensor_digest(self._storage).encode())
        if self._rows is not None:
            digest.update(tensor_digest(self._rows).encode())
        digest.update(tensor_digest(self.labels).encode())
        digest.update("\0".join(self.classes).encode())
        record: dict[str, object] = {"kind": type(self).__name__, "size": len(self),
                                     "image_shape": list(self._storage.shape[1:]), "classes": list(self.classes)}
        if len(self.labels):
            record["label_range"] = [int(self.labels.min()), int(self.labels.max())]
        record["digest"] = digest.hexdigest()
        return record

    def class_counts(self) -> dict[str, int]:
        """Number of items per class, in ``classes`` order."""
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))

    def __repr__(self) -> str:
        size = "x".join(str(dim) for dim in self._storage.shape[1:])
        return f"{type(self).__name__}({len(self)} images {size}, classes={self.classes})"


# --------------------------------------------------------------------------- decoding


# Modes PIL opens grayscale images of more than 8 bits in: 16-bit unsigned ("I;16" in its byte
# orders), 32-bit signed ("I", also 16-bit signed TIFFs) and 32-bit float ("F").
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# PIL has no 16-bit colour modes: it decodes 16-bit RGB and RGBA files (PNG, TIFF) to 8 bits by
# keeping the high byte of each sample, so 12-bit data comes out almost black. Decoded a second
# time with the opposite byte order, the same unpacker keeps the low byte instead (the PNG
# filters and TIFF codecs work on whole bytes before unpacking, so they are unaffected).
_OPPOSITE_BYTE_ORDER = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}
_WIDE_COLOUR_RAWMODES = frozenset(f"{bands};16{order}" for bands in ("RGB", "RGBA") for order in "BLN")
# 16-bit gray with alpha (PNG) opens as RGBA from the high bytes; the plain 8-bit RGBA unpacker
# has the same 4 bytes per pixel and hands them over as they are: gray high, gray low, alpha.
_WIDE_GRAY_ALPHA_RAWMODE = "LA;16B"


def _check_on_corrupt(on_corrupt: str) -> None:
    if on_corrupt not in ("error", "skip"):
        raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")


@contextmanager
def _open_image(path: str | Path, *, warn: bool = True) -> Iterator[Image.Image]:
    """``Image.open``, with PIL's decompression-bomb warning replaced by one naming the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    with image:
        limit = Image.MAX_IMAGE_PIXELS
        if warn and limit and image.width * image.height > limit:
            logger.warning(
                "%s has %d pixels, more than PIL.Image.MAX_IMAGE_PIXELS = %d (a possible decompression "
                "bomb); decoding it all the same (over twice the limit it would be refused)",
                path,
                image.width * image.height,
                limit,
            )
        yield image


def _rawmode(image: Image.Image) -> str | None:
    """The raw mode PIL will decode ``image`` from (before ``load``), if one for all its tiles."""
    rawmodes = {tile[3] if isinstance(tile[3], str) else tile[3][0] for tile in image.tile if tile[3]}
    rawmode = rawmodes.pop() if len(rawmodes) == 1 else None
    return rawmode if isinstance(rawmode, str) else None  # GIF's arguments, for one, are numbers


def _set_rawmode(image: Image.Image, rawmode: str) -> None:
    tiles = []
    for tile in image.tile:
        codec, extents, offset, args = tile
        args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
        # ImageFile._Tile (a named tuple) in Pillow 11 and later, a plain tuple before.
        tiles.append((codec, extents, offset, args) if type(tile) is tuple else type(tile)(codec, extents, offset, args))
    image.tile = tiles


def _wide_kind(image: Image.Image) -> str | None:
    """How to read an opened, not yet loaded image of more than 8 bits per sample, or None for
    8-bit images (and every other format), which PIL converts itself."""
    if image.mode in _WIDE_GRAY_MODES:
        return "float" if image.mode == "F" else "gray"
    rawmode = _rawmode(image)
    if image.mode in ("RGB", "RGBA") and rawmode in _WIDE_COLOUR_RAWMODES:
        return "colour"
    if image.mode == "RGBA" and rawmode == _WIDE_GRAY_ALPHA_RAWMODE:
        return "gray+alpha"
    return None


def _wide_samples(path: str | Path, image: Image.Image, kind: str) -> np.ndarray:
    """The samples of a :func:`_wide_kind` image at their full depth, EXIF orientation applied:
    ``H x W`` for gray (alpha dropped), ``H x W x 3`` for colour (alpha dropped)."""
    if kind in ("gray", "float"):
        return np.array(ImageOps.exif_transpose(image))
    if kind == "gray+alpha":
        _set_rawmode(image, "RGBA")
        raw = np.array(ImageOps.exif_transpose(image)).astype(np.uint16)
        return raw[..., 0] << 8 | raw[..., 1]
    rawmode = _rawmode(image)
    high = np.array(ImageOps.exif_transpose(image))[..., :3].astype(np.uint16)
    with _open_image(path, warn=False) as again:
        _set_rawmode(again, rawmode[:-1] + _OPPOSITE_BYTE_ORDER[rawmode[-1]])
        low = np.array(ImageOps.exif_transpose(again))[..., :3].astype(np.uint16)
    return high << 8 | low


def _scale_to_uint8(samples: np.ndarray, *, is_float: bool) -> np.ndarray:
    """Samples of more than 8 bits as uint8, by the rule documented in :func:`load_imagefolder`."""
    values = samples.astype(np.float64)
    if is_float:
        finite = np.isfinite(values)
        if not finite.all():
            raise ValueError(
                f"{int((~finite).sum())} of its {values.size} pixel values are NaN or infinite; "
                "fix or remove the file"
            )
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high <= 1:
            return np.rint(values * 255).astype(np.uint8)
    else:
        # Zero stays black in unsigned images; signed ones (CT in Hounsfield units) start at their minimum.
        low, high = min(0.0, float(values.min())), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - low) * (255 / (high - low))), 0, 255).astype(np.uint8)


def _read_rgb(path: str | Path, image_size: int) -> np.ndarray:
    with _open_image(path) as image:
        # Lets the JPEG decoder scale down by 1/2..1/8 while decoding, far cheaper than a
        # full-size decode followed by a resize; a no-op for other formats.
        image.draft("RGB", (image_size, image_size))
        kind = _wide_kind(image)
        if kind is None:
            # 8-bit images: exactly as before version 2 of the cache, whose entries they reuse.
            image = ImageOps.exif_transpose(image)
            if image.mode == "P":
                # Palette transparency only survives (and converts without a warning) via RGBA.
                image = image.convert("RGBA")
            image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
            return np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays
        samples = _wide_samples(path, image, kind)
    pixels = Image.fromarray(_scale_to_uint8(samples, is_float=kind == "float"))
    return np.array(pixels.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC))


def _decodes_differently(path: Path) -> bool:
    """Whether ``path`` holds an image of more than 8 bits, which version 1 of the cache decoded
    wrongly; False for 8-bit images and for files that cannot be opened (unchanged either way)."""
    try:
        with _open_image(path, warn=False) as image:
            return _wide_kind(image) is not None
    except Exception:  # whatever PIL cannot open fails to decode now as it did then
        return False


def _decode_images(
    paths: Sequence[str | Path],
    image_size: int,
    *,
    on_corrupt: OnCorrupt,
    progress: bool,
    description: str,
) -> tuple[Tensor, np.ndarray, list[str]]:
    """Decode ``paths`` to a uint8 ``N x 3 x S x S`` tensor.

    Returns:
        The images of the readable files, the positions in ``paths`` they came from, and the
        paths that were skipped as unreadable.
    """
    images = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    kept: list[int] = []
    skipped: list[str] = []
    for position, path in enumerate(progress_bar(paths, desc=description, unit="img", disable=not progress)):
        try:
            pixels = _read_rgb(path, image_size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            reason = str(error)
            if isinstance(error, Image.DecompressionBombError):
                # PIL's message gives the pixel count and its limit, but neither the file nor the fix.
                reason += (
                    " (refused as a possible decompression bomb: PIL.Image.MAX_IMAGE_PIXELS is "
                    f"{Image.MAX_IMAGE_PIXELS}; if the file is trusted, raise it)"
                )
            if on_corrupt == "error":
                raise CorruptImageError(f"Cannot decode image {path}: {reason}") from error
            logger.warning("Skipping unreadable image %s: %s", path, reason)
            skipped.append(str(path))
            continue
        images[len(kept)] = torch.from_numpy(pixels).permute(2, 0, 1)
        kept.append(position)
    if skipped:
        # Clone so that the cache does not store the unused rows of the preallocated tensor.
        images = images[: len(kept)].clone()
    return images, np.asarray(kept, dtype=np.int64), skipped


# --------------------------------------------------------------------------- cache


def _cache_key(version: int, image_size: int, stats: Sequence[tuple[str, Path, os.stat_result]]) -> str:
    digest = hashlib.sha256(f"v{version} size={image_size}\n".encode())
    for group, path, stat in stats:
        digest.update(f"{group}\t{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _cache_file(
    cache_dir: str | os.PathLike | None,
    name: str,
    files: Sequence[tuple[str, Path]],
    image_size: int,
) -> Path:
    """Cache path keyed by the (group, path, size, mtime) of every file, the image size and the
    decoder's version (:data:`_CACHE_FORMAT_VERSION`).

    Using the folder first removes its stale temporary files (:func:`clean_stale_temporaries`).
    A cache of version 1 (before images of more than 8 bits were scaled by their range) is
    renamed to the current key when no file decodes differently now (its images are the same;
    checking costs one header read per file, once), and removed otherwise.
    """
    folder = _resolve_cache_dir(cache_dir)
    if folder.is_dir():
        clean_stale_temporaries(folder, _CACHE_TEMPORARIES)
    stats = [(group, path.resolve(), path.stat()) for group, path in files]
    prefix = f"{name}-{image_size}px-"
    current = folder / f"{prefix}{_cache_key(_CACHE_FORMAT_VERSION, image_size, stats)}.pt"
    previous = folder / f"{prefix}{_cache_key(1, image_size, stats)}.pt"
    if not current.exists() and previous.is_file():
        if any(_decodes_differently(path) for _, path, _ in stats):
            logger.info("Decoding again: cache %s predates the decoding of images of more than 8 bits", previous)
            previous.unlink(missing_ok=True)
        else:
            try:
                os.replace(previous, current)
            except FileNotFoundError:  # another process renamed it first
                pass
    return current


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        logger.warning("Ignoring unreadable cache %s (%s); decoding again", path, error)
        return None
    logger.info("Loaded decoded images from cache %s", path)
    return payload


def _write_cache(path: Path, payload: dict) -> None:
    """Write ``payload`` atomically, so that readers (other workers) never see a half-written cache.

    The temporary file names its writer (:func:`kdkit.checkpoint.atomic_write`), so that one a
    kill left behind is removed the next time the cache folder is used, while a live writer's is
    kept. A cache that cannot be written is a warning: the images are decoded and in memory all
    the same.
    """
    try:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        logger.warning("Could not write the decoded-image cache %s (%s); the next load decodes again", path, error)
        return
    logger.info("Cached decoded images in %s", path)


def _report_cached_skips(skipped: Sequence[str], on_corrupt: OnCorrupt, cache: Path) -> None:
    if not skipped:
        return
    if on_corrupt == "error":
        raise CorruptImageError(
            f"Cannot decode image {skipped[0]} ({len(skipped)} unreadable file(s) recorded in "
            f"cache {cache}); fix or remove them, or pass on_corrupt='skip'"
        )
    for path in skipped:
        logger.warning("Skipping unreadable image %s (recorded in cache %s)", path, cache)


# --------------------------------------------------------------------------- image folders


def _is_hidden(path: Path) -> bool:
    # Same convention as HF data file resolution: ".DS_Store", "._x.jpg", "__MACOSX".
    return path.name.startswith((".", "__"))


def _image_extensions() -> frozenset[str]:
    # The rule HF imagefolder's extension list was generated with: every extension Pillow
    # can open.
    Image.init()
    extension_formats = Image.registered_extensions()
    return frozenset(ext for ext, image_format in extension_formats.items() if image_format in Image.OPEN)


def _list_class_images(split_dir: Path, extensions: frozenset[str]) -> list[Path]:
    """Images in ``split_dir/<class>/``, sorted; empty class folders are an error."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"Image folder {split_dir} does not exist")
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not _is_hidden(p))
    if not class_dirs:
        raise ValueError(f"Image folder {split_dir} has no class subfolders (expected <class>/<image> files)")
    files: list[Path] = []
    for class_dir in class_dirs:
        images = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and not _is_hidden(p) and p.suffix.lower() in extensions
        )
        if not images:
            raise ValueError(f"Class folder {class_dir} contains no images")
        files.extend(images)
    return files


def _default_splits(root: Path) -> dict[str, str]:
    subfolders = {p.name.lower(): p.name for p in root.iterdir() if p.is_dir()}
    splits = {}
    for split, aliases in _SPLIT_FOLDER_ALIASES.items():
        if found := next((subfolders[alias] for alias in aliases if alias in subfolders), None):
            splits[split] = found
    # No split folders: the root itself holds the class folders.
    return splits or {"train": "."}


def load_imagefolder(
    path: str | os.PathLike,
    image_size: int = 224,
    *,
    splits: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    on_corrupt: OnCorrupt = "error",
    progress: bool = True,
) -> dict[str, ImageTensorDataset]:
    """Load a Kaggle/ImageNet-style ``<split>/<class>/<image>`` folder.

    Every image is converted to RGB (grayscale, RGBA and palette images included), resized to
    ``image_size x image_size`` with antialiasing and stored as uint8. Images of more than 8
    bits per sample (16-bit grayscale or colour PNG and TIFF, 32-bit integer and float TIFF,
    as MRI and CT slices are often exported) are scaled to 0..255 by their own range first:

    * integer images: ``[min(0, image minimum), image maximum]`` maps linearly to 0..255, so an
      unsigned image keeps 0 as black and its maximum as white, and a signed one (CT in
      Hounsfield units) runs from its minimum; a constant image is white, or black when its
      value is 0 or below (an empty range). Colour images use one range over their red, green
      and blue samples, so their colours keep their balance;
    * float images: values within [0, 1] map to ``value * 255``; otherwise the image's
      minimum..maximum maps to 0..255 (a constant image is black). A NaN or infinite pixel
      makes the file unreadable (see ``on_corrupt``);

    then rounded to the nearest integer, replicated to three channels (for gray images; alpha is
    dropped, as for 8-bit images) and resized like 8-bit images. 8-bit images are converted by
    PIL as they always were.

    The result is cached in ``cache_dir`` keyed by the file list (paths, sizes, modification
    times), the image size and the decoder's version, so a repeated call skips decoding; the
    temporary files of cache writes that were killed are removed the next time the folder is
    used. Files without an image extension (``notes.txt``) and hidden files (``.DS_Store``) are ignored.
    Class names are the class folder names, the same in every split (so labels agree across
    splits), at least two of them.

    Args:
        path: The data set folder.
        image_size: Side of the square images.
        splits: Split name -> subfolder of ``path``, e.g. ``{"train": "Training"}``. Default:
            whichever of ``train``/``training``, ``val``/``valid``/``validation`` and
            ``test``/``testing`` exist (case-insensitive), else ``path`` itself as ``"train"``.
        cache_dir: Cache folder; default ``$KDKIT_CACHE_DIR`` or ``~/.cache/kdkit``.
        on_corrupt: ``"error"`` raises :class:`CorruptImageError` naming an unreadable file
            (truncated, not an image, NaN pixels, or over twice ``PIL.Image.MAX_IMAGE_PIXELS``
            pixels, a possible decompression bomb; over the limit itself, an image is decoded
            with a warning naming it); ``"skip"`` leaves it out, logs a warning and lists it in
            ``dataset.skipped``.
        progress: Show progress bars.

    Returns:
        Split name -> dataset.

    Raises:
        FileNotFoundError: ``path`` or a split folder does not exist.
        ValueError: A split has no class folders, or a class folder has no images.
        kdkit.image_data.ImageDataError: Class folders that differ between splits (a class
            missing from one, or names equal only when case is ignored, ``Training/pituitary``
            against ``Testing/Pituitary``), or a single class. It is a ValueError.
        CorruptImageError: An unreadable image with ``on_corrupt="error"``.
    """
    _check_on_corrupt(on_corrupt)
    # Absolute paths: they key the cache and are the datasets' ``paths``.
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist")
    chosen_splits = _default_splits(root) if splits is None else splits
    split_dirs = {name: root / subfolder for name, subfolder in chosen_splits.items()}
    if not split_dirs:
        raise ValueError("splits must name at least one split")
    extensions = _image_extensions()
    files = {name: _list_class_images(folder, extensions) for name, folder in split_dirs.items()}
    classes = sorted({file.parent.name for split_files in files.values() for file in split_files})
    _check_classes(root, files, split_dirs, classes)

    cache = _cache_file(
        cache_dir,
        root.resolve().name,
        [(name, file) for name, split_files in files.items() for file in split_files],
        image_size,
    )
    payload = _read_cache(cache)
    if payload is None:
        payload = _decode_imagefolder(files, split_dirs, classes, image_size, on_corrupt, progress)
        _write_cache(cache, payload)
    else:
        _report_cached_skips(
            [skipped for split in payload["splits"].values() for skipped in split["skipped"]], on_corrupt, cache
        )
    return {
        name: ImageTensorDataset(
            split["images"],
            split["labels"],
            payload["classes"],
            paths=split["paths"],
            skipped=split["skipped"],
        )
        for name, split in payload["splits"].items()
    }


def _check_classes(
    root: Path, files: Mapping[str, Sequence[Path]], split_dirs: Mapping[str, Path], classes: Sequence[str]
) -> None:
    """The class checks of :func:`kdkit.image_data.load_image_data`, on a listed folder."""
    # Imported here: kdkit.image_data builds on this module, which must not import it first.
    from .image_data import _check_same_classes, _refuse_single_class

    found = {split: {} for split in files}
    for split, split_files in files.items():
        for file in split_files:
            found[split].setdefault(file.parent.name, []).append(file)
    _check_same_classes(root, found, split_dirs)
    first = next(iter(split_dirs.values()))
    _refuse_single_class(root, classes, first / classes[0])


def _decode_imagefolder(
    files: Mapping[str, Sequence[Path]],
    split_dirs: Mapping[str, Path],
    classes: Sequence[str],
    image_size: int,
    on_corrupt: OnCorrupt,
    progress: bool,
) -> dict:
    # Labels are the class folder names, as HF ``imagefolder`` gave them (which loaded these
    # folders until it was found to hand back exactly this listing, order and labels, at the
    # cost of an extra copy in its own cache and "Downloading data" bars for local files).
    class_index = {name: index for index, name in enumerate(classes)}
    splits = {}
    for name, split_files in files.items():
        paths = [str(file) for file in split_files]
        images, kept, skipped = _decode_images(
            paths,
            image_size,
            on_corrupt=on_corrupt,
            progress=progress,
            description=f"Decoding {name}",
        )
        if not len(kept):
            raise ValueError(f"No readable images in {split_dirs[name]}")
        labels = torch.as_tensor([class_index[file.parent.name] for file in split_files], dtype=torch.int64)
        labels = labels[torch.from_numpy(kept)]
        kept_paths = [paths[position] for position in kept.tolist()]
        splits[name] = {"images": images, "labels": labels, "paths": kept_paths, "skipped": skipped}
    return {"classes": list(classes), "splits": splits}


# --------------------------------------------------------------------------- subsets


def _default_num_processes() -> int:
    # Set by ``accelerate launch`` and torchrun in every data-parallel process.
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def per_process_batch_size(batch_size: int, num_processes: int) -> int:
    """The batch each of ``num_processes`` data-parallel processes loads for a global ``batch_size``.

    Args:
        batch_size: Global batch: the images of one optimiser step over all processes.
        num_processes: Data-parallel processes.

    Returns:
        ``batch_size // num_processes``.

    Raises:
        ValueError: A non-positive argument, or a batch that does not split evenly.
    """
    if batch_size < 1 or num_processes < 1:
        raise ValueError(f"batch_size and num_processes must be positive, got {batch_size} and {num_processes}")
    if batch_size % num_processes:
        raise ValueError(
            f"global batch size {batch_size} does not divide evenly across {num_processes} processes; "
            f"pick a multiple of {num_processes}"
        )
    return batch_size // num_processes


def _drops_last(num_items: int, batch_size: int, *, train: bool) -> bool:
    # A set no larger than one global batch keeps its partial batch, so that it still trains.
    return train and num_items > batch_size


def batches_per_process(num_items: int, batch_size: int, *, train: bool, num_processes: int) -> int:
    """Batches each process iterates per epoch from :func:`make_loader` once Accelerate shards it.

    Accelerate's ``prepare_data_loader`` (with its defaults, ``even_batches=True``) deals the
    per-process batches of the loader out to the processes in turn: when the last partial batch
    is dropped (training on a set larger than one global batch), each process gets
    ``floor(batches / num_processes)``, that is ``floor(num_items / batch_size)``; otherwise
    ``ceil(batches / num_processes)``, the processes that run short repeating batches from the
    start of the epoch.

    Args:
        num_items: Items in the data set.
        batch_size: Global batch size, as given to :func:`make_loader`.
        train: As given to :func:`make_loader`.
        num_processes: Data-parallel processes.

    Returns:
        The length of each process's sharded loader.

    Raises:
        ValueError: As :func:`per_process_batch_size`.
    """
    local = per_process_batch_size(batch_size, num_processes)
    if _drops_last(num_items, batch_size, train=train):
        return num_items // local // num_processes
    return math.ceil(math.ceil(num_items / local) / num_processes)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int = 0,
    num_processes: int | None = None,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader of one data-parallel process's share of the global batch.

    Training: shuffled, the last partial global batch dropped, except when the data set is no
    larger than one global batch, so that a tiny training set still yields a step. Evaluation:
    in order, every image. Wrap the loader with ``accelerator.prepare`` to shard it across the
    processes; :func:`batches_per_process` says how many batches each then gets.

    Args:
        dataset: The data set, e.g. an :class:`ImageTensorDataset` (its :meth:`~ImageTensorDataset.as_uint8`
            view for augmentation on the device).
        batch_size: Global batch size (the paper's): the images of one optimiser step summed
            over all processes. Each process's loader gets ``batch_size // num_processes``.
        train: Shuffle and drop the last partial batch.
        workers: Worker processes; with any, they persist across epochs.
        num_processes: Data-parallel processes; by default ``$WORLD_SIZE`` (set by
            ``accelerate launch`` and torchrun), else 1.
        pin_memory: Page-locked batches, for asynchronous (``non_blocking``) copies to a GPU;
            by default whenever CUDA is available.

    Raises:
        ValueError: ``batch_size`` does not divide by ``num_processes``.
    """
    num_processes = _default_num_processes() if num_processes is None else num_processes
    local = per_process_batch_size(batch_size, num_processes)
    return DataLoader(
        dataset,
        batch_size=local,
        shuffle=train,
        drop_last=_drops_last(len(dataset), batch_size, train=train),
        num_workers=workers,
        # Training workers restart every epoch: a persistent worker keeps its own random state
        # and its sampler's order across epochs, so a resumed run would differ from an
        # uninterrupted one. Evaluation draws nothing at random and may keep its workers.
        persistent_workers=workers > 0 and not train,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )


def balanced_subset_indices(
    labels: Sequence[int] | np.ndarray | Tensor, per_class: int | None, seed: int
) -> np.ndarray:
    """Pick up to ``per_class`` items of every class, at random but reproducibly.

    Each class gets a seeded permutation and contributes its first ``min(per_class, size)``
    items, so for one seed the subsets are nested: the 100-per-class subset contains the
    50-per-class one.

    Args:
        labels: Class index of each item.
        per_class: Items per class; None keeps every item.
        seed: Seed of the permutations.

    Returns:
        Sorted positions into ``labels``.
    """
    labels = np.asarray(labels)
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be positive or None, got {per_class}")
    generator = np.random.default_rng(seed)
    chosen = [
        generator.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def stratified_split_indices(
    labels: Sequence[int] | np.ndarray | Tensor,
    val_fraction: float,
    seed: int,
    *,
    name: str = "the data set",
    classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into train and validation parts with the same class proportions.

    Use it to carve a validation set out of the training data, so that model selection never
    looks at the test set. The validation part has ``ceil(val_fraction * len(labels))`` items
    (sklearn's ``train_test_split``).

    Args:
        labels: Class index of each item.
        val_fraction: Fraction of items for validation, in (0, 1).
        seed: Seed of the split.
        name: What ``labels`` belong to, for errors, e.g. ``"the images of Training/"``.
        classes: Class names, for errors; by default classes are named by their index.

    Returns:
        ``(train_positions, val_positions)``, each sorted.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1).
        SplitError: Too few items for the split: a class with a single item, or fewer items on a
            side than there are classes. The message names the set, its size, classes and
            fraction, and the fraction or images that would do.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    _check_splittable(labels, val_fraction, name, classes)
    try:
        train_positions, val_positions = train_test_split(
            np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=seed
        )
    except ValueError as error:  # anything the checks above did not foresee: still named
        raise SplitError(f"Cannot split {name} ({len(labels)} images) with val_fraction={val_fraction}: {error}") from error
    return np.sort(train_positions), np.sort(val_positions)


def _check_splittable(labels: np.ndarray, val_fraction: float, name: str, classes: Sequence[str] | None) -> None:
    """Raise :class:`SplitError` where sklearn's stratified ``train_test_split`` would refuse."""
    values, counts = np.unique(labels, return_counts=True)

    def named(value) -> str:
        return repr(classes[int(value)]) if classes is not None else f"class {value}"

    where = f"Cannot split {name} ({len(labels)} images of {len(values)} classes) with val_fraction={val_fraction}"
    if single := [named(value) for value, count in zip(values, counts) if count == 1]:
        raise SplitError(
            f"{where}: {', '.join(single)} {'has' if len(single) == 1 else 'have'} a single image, and a "
            "stratified split needs at least 2 of every class; add images of it or leave it out"
        )
    val_count = math.ceil(val_fraction * len(labels))  # as train_test_split rounds
    train_count = len(labels) - val_count
    if val_count < len(values):
        lowest = math.ceil(len(values) / len(labels) * 100) / 100
        advice = f"raise val_fraction to at least {lowest:.2f} or add images" if lowest < 1 else "add images"
        raise SplitError(
            f"{where}: that gives {val_count} validation image(s), fewer than the {len(values)} classes "
            f"(every class needs one); {advice}"
        )
    if train_count < len(values):
        raise SplitError(
            f"{where}: that leaves {train_count} training image(s), fewer than the {len(values)} classes "
            "(every class needs one); lower val_fraction or add images"
        )


# --------------------------------------------------------------------------- transforms


def eval_transforms(
    image_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """Evaluation transforms for uint8 ``C x H x W`` tensors: resize, float, normalise."""
    return v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


# --------------------------------------------------------------------------- SMOTE


def smote_balance(
    images: Tensor, labels: Tensor | Sequence[int], *, seed: int = 0, k_neighbors: int = 5
) -> tuple[Tensor, Tensor]:
    """Oversample every class to the size of the largest with SMOTE (imbalanced-learn).

    SMOTE runs on the flattened images as float32: on uint8 arrays (as in the HDKD authors'
    code) the difference to the neighbour wraps around modulo 256 and the synthetic images are
    corrupted. The synthetic pixels are clipped to [0, 255] and rounded back to uint8, so each
    lies between the values of its two parents. ``k_neighbors`` is lowered, with a warning,
    when a class to oversample has at most ``k_neighbors`` samples. Memory: the float32 copy
    and its resampled version take about ``8 * N_balanced * C * H * W`` bytes.

    Args:
        images: uint8 ``N x C x H x W`` tensor.
        labels: ``N`` class indices.
        seed: Seed of SMOTE's random choices.
        k_neighbors: Neighbours SMOTE interpolates towards.

    Returns:
        ``(images, labels)``: the originals unchanged, followed by the synthetic samples.

    Raises:
        ValueError: Wrong dtype or shape, or a class to oversample with a single sample.
    """
    from imblearn.over_sampling import SMOTE  # heavy import, only needed here

    labels = torch.as_tensor(labels, dtype=torch.int64)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be a uint8 N x C x H x W tensor, got {images.dtype} {tuple(images.shape)}"
        )
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    counts = torch.bincount(labels)
    to_oversample = counts[(counts > 0) & (counts < counts.max())]
    if not len(to_oversample):
        return images, labels
    smallest = int(to_oversample.min())
    if smallest < 2:
        raise ValueError("SMOTE needs at least 2 samples in every class it oversamples")
    neighbours = min(k_neighbors, smallest - 1)
    if neighbours < k_neighbors:
        logger.warning(
            "Smallest class to oversample has %d samples: SMOTE k_neighbors reduced from %d to %d",
            smallest,
            k_neighbors,
            neighbours,
        )
    flat = images.cpu().reshape(len(images), -1).numpy().astype(np.float32)
    resampled, resampled_labels = SMOTE(k_neighbors=neighbours, random_state=seed).fit_resample(
        flat, labels.numpy()
    )
    # imbalanced-learn returns the original rows first, then the synthetic ones.
    synthetic = np.rint(np.clip(resampled[len(flat) :], 0, 255)).astype(np.uint8)
    synthetic_images = torch.from_numpy(synthetic).reshape(-1, *images.shape[1:])
    return torch.cat([images.cpu(), synthetic_images]), torch.as_tensor(resampled_labels, dtype=torch.int64)
