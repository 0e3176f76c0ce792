"""The HDKD paper's two data sets: where they live, and their loaders with the paper's splits.

Data sets are folders under a *data root* (``<root>/brain_tumor_mri/``, ``<root>/ham10000/``),
found by :func:`resolve_data_root`. :func:`load_brain_tumor_mri` reads the Kaggle folder with
its own train/test split through :func:`kdkit.data.load_imagefolder`; :func:`load_ham10000`
reads the metadata file and splits by lesion. Both decode every image once, at the training
resolution, into a cached uint8 :class:`kdkit.data.ImageTensorDataset`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

# The decoding and cache helpers behind kdkit.data.load_imagefolder: HAM10000 lists its images
# in a metadata file rather than in class folders, but is decoded and cached the same way.
from kdkit.data import (
    ImageTensorDataset,
    OnCorrupt,
    _cache_file,
    _check_on_corrupt,
    _decode_images,
    _read_cache,
    _report_cached_skips,
    _write_cache,
    load_imagefolder,
)

__all__ = [
    "DATASETS",
    "DATA_ROOT_ENV",
    "dataset_dir",
    "load_brain_tumor_mri",
    "load_dataset",
    "load_ham10000",
    "resolve_data_root",
]

DATA_ROOT_ENV = "KDKIT_DATA_ROOT"
"""The environment variable that names the data root."""

_SHARED_DATA = Path("..", "shared", "data")
# The repository checkout holding the ``kdkit_zoo`` package (and ``kdkit`` beside it), so an
# editable install finds the data from any working directory.
_REPO_ROOT = Path(__file__).resolve().parents[2]
_DATASET_SOURCES = {
    "brain_tumor_mri": (
        'the Kaggle "Brain Tumor MRI Dataset" by Masoud Nickparvar, unpacked so that the '
        "folder holds Training/ and Testing/"
    ),
    "ham10000": (
        "HAM10000 by Tschandl et al. (ISIC archive or Harvard Dataverse), with "
        "HAM10000_metadata.csv next to an images/ folder of <image_id>.jpg files"
    ),
}


# --------------------------------------------------------------------------- locations


def _data_root_candidates(data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    """Where the data root may be, in lookup order, each with where that guess came from."""
    if data_dir is not None:
        return [(Path(data_dir).expanduser(), "the data_dir argument")]
    if env_root := os.environ.get(DATA_ROOT_ENV):
        return [(Path(env_root).expanduser(), f"${DATA_ROOT_ENV}")]
    return [
        (Path.cwd() / _SHARED_DATA, "relative to the current directory"),
        (_REPO_ROOT / _SHARED_DATA, "relative to the kdkit repository"),
    ]


def _locate_data_root(data_dir: str | os.PathLike | None) -> tuple[Path, str]:
    candidates = _data_root_candidates(data_dir)
    if len(candidates) == 1:  # explicit choice: reported by dataset_dir if it is missing
        return candidates[0]
    for path, origin in candidates:
        if path.is_dir():
            return path.resolve(), origin
    looked = "; ".join(f"{path} ({origin})" for path, origin in candidates)
    raise FileNotFoundError(
        f"No data root found. Looked in: {looked}. Pass data_dir (--data-dir) or set "
        f"{DATA_ROOT_ENV} to the folder that holds the data sets."
    )


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Find the folder that holds the data sets (``brain_tumor_mri/``, ``ham10000/``, ...).

    Looked up in order: the explicit ``data_dir``, the ``KDKIT_DATA_ROOT`` environment
    variable, ``../shared/data`` relative to the current directory, then ``../shared/data``
    relative to the repository that contains the ``kdkit`` and ``kdkit_zoo`` packages.

    Args:
        data_dir: Explicit data root (e.g. an example's ``--data-dir``); used as given.

    Returns:
        The data root. An explicit ``data_dir`` or ``KDKIT_DATA_ROOT`` is returned even if it
        does not exist, so that :func:`dataset_dir` can report it.

    Raises:
        FileNotFoundError: No default location exists; the message lists where it looked.
    """
    return _locate_data_root(data_dir)[0]


def _is_dataset_folder(name: str, folder: Path) -> bool:
    """Whether ``folder`` is the data set ``name`` itself (Brain Tumor MRI's Training/ and Testing/, HAM10000's metadata CSV)."""
    if not folder.is_dir():
        return False
    entries = {entry.name.lower() for entry in folder.iterdir()}
    if name == "brain_tumor_mri":
        return {"training", "testing"} <= entries
    if name == "ham10000":
        return "ham10000_metadata.csv" in entries
    return False


def dataset_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Return ``<data root>/<name>``, failing clearly if it is missing.

    Args:
        name: Data set folder name, e.g. ``"brain_tumor_mri"`` or ``"ham10000"``.
        data_dir: Explicit data root, see :func:`resolve_data_root`.

    Raises:
        FileNotFoundError: The folder does not exist; the message says where it looked and
            where the data set can be obtained.
    """
    source = _DATASET_SOURCES.get(name, f"the {name!r} data set")
    if data_dir is not None and _is_dataset_folder(name, Path(data_dir)):
        return Path(data_dir)  # the data set's own folder rather than the root above it
    try:
        root, origin = _locate_data_root(data_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error} Then download {source} into <data root>/{name}.") from None
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Data set folder {folder} not found (data root from {origin}). Download {source} and "
            f"put it there, or point data_dir / {DATA_ROOT_ENV} at the folder that contains {name}/."
        )
    return folder


# --------------------------------------------------------------------------- Brain Tumor MRI


def load_brain_tumor_mri(
    data_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    *,
    cache_dir: str | os.PathLike | None = None,
    on_corrupt: OnCorrupt = "error",
    progress: bool = True,
) -> dict[str, ImageTensorDataset]:
    """Load the Brain Tumor MRI data set (Kaggle, Masoud Nickparvar) with its own split.

    Classes: ``['glioma', 'meningioma', 'notumor', 'pituitary']``. With the shared copy,
    ``"train"`` (``Training/``) has 5708 images and ``"test"`` (``Testing/``) 1311.

    Args:
        data_dir: Data root holding ``brain_tumor_mri/``, see :func:`resolve_data_root`.
        image_size: Side of the square images.
        cache_dir: Decoded-image cache folder, see :func:`kdkit.data.load_imagefolder`.
        on_corrupt: ``"error"`` or ``"skip"``, see :func:`kdkit.data.load_imagefolder`.
        progress: Show progress bars.

    Returns:
        ``{"train": ..., "test": ...}``.
    """
    return load_imagefolder(
        dataset_dir("brain_tumor_mri", data_dir),
        image_size,
        splits={"train": "Training", "test": "Testing"},
        cache_dir=cache_dir,
        on_corrupt=on_corrupt,
        progress=progress,
    )


# --------------------------------------------------------------------------- HAM10000

_HAM10000_COLUMNS = ("lesion_id", "image_id", "dx")


def load_ham10000(
    data_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    *,
    test_size: int = 828,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    on_corrupt: OnCorrupt = "error",
    progress: bool = True,
) -> dict[str, ImageTensorDataset]:
    """Load HAM10000 with a train/test split grouped by lesion and stratified by diagnosis.

    Images come from ``images/<image_id>.jpg`` as listed in ``HAM10000_metadata.csv``;
    classes are the sorted diagnoses ``['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']``.
    The split is drawn over lesions (``lesion_id``), stratified by their diagnosis, so all
    images of one lesion land on the same side; it depends only on ``seed``. The test side
    gets ``test_size`` images' worth of lesions, hence approximately ``test_size`` images
    (835 of 10015 for the default 828 and seed 0; the HDKD paper uses 828). The decoded
    images of the whole set are cached once; both splits share them.

    Args:
        data_dir: Data root holding ``ham10000/``, see :func:`resolve_data_root`.
        image_size: Side of the square images (the 4:3 images are resized, not cropped).
        test_size: Approximate number of test images.
        seed: Seed of the split.
        cache_dir: Decoded-image cache folder, see :func:`kdkit.data.load_imagefolder`.
        on_corrupt: ``"error"`` or ``"skip"``, see :func:`kdkit.data.load_imagefolder`.
        progress: Show a progress bar.

    Returns:
        ``{"train": ..., "test": ...}``.

    Raises:
        FileNotFoundError: The folder, the metadata file or a listed image is missing.
        ValueError: Malformed metadata (or a lesion with several diagnoses), or an impossible
            ``test_size``.
    """
    _check_on_corrupt(on_corrupt)
    folder = dataset_dir("ham10000", data_dir)
    metadata = folder / "HAM10000_metadata.csv"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found; expected it next to {folder / 'images'}")
    with metadata.open(newline="") as stream:
        reader = csv.DictReader(stream)
        missing_columns = set(_HAM10000_COLUMNS) - set(reader.fieldnames or ())
        if missing_columns:
            raise ValueError(f"{metadata} lacks the columns {sorted(missing_columns)}")
        records = list(reader)
    if not records:
        raise ValueError(f"{metadata} lists no images")
    if not 0 < test_size < len(records):
        raise ValueError(f"test_size must be in (0, {len(records)}), got {test_size}")

    paths = [folder / "images" / f"{record['image_id']}.jpg" for record in records]
    absent = [path for path in paths if not path.is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} images listed in {metadata} are missing, e.g. {absent[0]}")
    classes = sorted({record["dx"] for record in records})
    class_index = {name: index for index, name in enumerate(classes)}

    cache = _cache_file(cache_dir, "ham10000", [("all", path) for path in paths], image_size)
    payload = _read_cache(cache)
    if payload is None:
        images, kept, skipped = _decode_images(
            paths, image_size, on_corrupt=on_corrupt, progress=progress, description="Decoding ham10000"
        )
        payload = {"images": images, "kept": torch.from_numpy(kept), "skipped": skipped}
        _write_cache(cache, payload)
    else:
        _report_cached_skips(payload["skipped"], on_corrupt, cache)
    kept = payload["kept"].numpy()

    labels = np.array([class_index[record["dx"]] for record in records])[kept]
    lesions, lesion_of_image = np.unique([record["lesion_id"] for record in records], return_inverse=True)
    lesion_of_image = lesion_of_image[kept]
    lesion_labels = np.zeros(len(lesions), dtype=np.int64)
    lesion_labels[lesion_of_image] = labels
    if not np.array_equal(lesion_labels[lesion_of_image], labels):
        raise ValueError(f"{metadata} gives some lesion_id images with different diagnoses")
    # Splitting lesions with train_test_split takes milliseconds; StratifiedGroupKFold over the
    # 7470 lesions takes seconds, on every load.
    present = np.unique(lesion_of_image)
    _, test_lesions = train_test_split(
        present,
        test_size=round(test_size * len(present) / len(labels)),
        stratify=lesion_labels[present],
        random_state=seed,
    )
    is_test = np.isin(lesion_of_image, test_lesions)
    train_indices, test_indices = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    kept_paths = [str(paths[position]) for position in kept.tolist()]
    full = ImageTensorDataset(
        payload["images"], labels, classes, paths=kept_paths, skipped=payload["skipped"]
    )
    return {"train": full.subset(train_indices), "test": full.subset(test_indices)}


# --------------------------------------------------------------------------- by name

_LOADERS: dict[str, Callable[..., dict[str, ImageTensorDataset]]] = {
    "brain_tumor_mri": load_brain_tumor_mri,
    "ham10000": load_ham10000,
}
DATASETS = tuple(_LOADERS)
"""The data sets the experiment knows how to load, by name."""


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, image_size: int = 224) -> dict[str, ImageTensorDataset]:
    """Load the data set ``name`` of :data:`DATASETS` with its default split.

    Args:
        name: ``"brain_tumor_mri"`` or ``"ham10000"``.
        data_dir: Data root, see :func:`resolve_data_root`.
        image_size: Side of the square images.

    Returns:
        ``{"train": ..., "test": ...}``.

    Raises:
        ValueError: An unknown ``name``.
    """
    if name not in _LOADERS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return _LOADERS[name](data_dir, image_size)
