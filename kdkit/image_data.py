"""A user's own image data set from a folder or a CSV file: recognised, checked, split, decoded.

:func:`load_image_data` takes a path and returns train / test (and validation) splits of
:class:`~kdkit.data.ImageTensorDataset`, with a JSON-able record of how they were made. It
recognises three layouts:

* ``split folders``: ``train/`` and ``test/`` (optionally ``val/``) folders, or the Kaggle
  spelling ``Training/`` and ``Testing/`` (case-insensitive), each holding one folder per class;
* ``class folders``: one folder per class; test and validation images are carved off by a
  seeded, stratified split;
* ``csv``: a CSV file with ``path`` and ``label`` columns (paths relative to the CSV's folder)
  and an optional ``group`` column (a patient, a lesion): a group never lies on both sides of a
  split.

Everything that would make the data unusable is found before a single image is decoded, and
reported with the folder, file, row or class at fault (:class:`ImageDataError`). Decoding and
its on-disk cache are :mod:`kdkit.data`'s (:func:`~kdkit.data.load_imagefolder` for folders).
"""

from __future__ import annotations

import csv
import difflib
import logging
import math
import numbers
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from . import data as _data
from .data import ImageTensorDataset, OnCorrupt

__all__ = [
    "CSV_COLUMNS",
    "LAYOUTS",
    "ImageData",
    "ImageDataError",
    "load_image_data",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("split folders", "class folders", "csv")
"""The layouts :func:`load_image_data` recognises, as written in :attr:`ImageData.layout`."""

CSV_COLUMNS = ("path", "label", "group")
"""Columns of a CSV data set: ``path`` and ``label`` required, ``group`` optional."""

# Problems listed in one error before the rest are counted.
_MAX_LISTED = 20
# StratifiedGroupKFold makes k folds; test (or val) is the union of m of them, with m / k the
# fraction nearest the requested one among k <= _MAX_FOLDS (the smallest k within tolerance).
_MAX_FOLDS = 20
_FOLD_FRACTION_TOLERANCE = 0.01


class ImageDataError(ValueError):
    """A data set that cannot be used as it is; the message names what is wrong and where."""


@dataclass
class ImageData:
    """Splits of a data set loaded by :func:`load_image_data`, and how they were made.

    Attributes:
        splits: ``"train"``, ``"test"`` and, unless disabled, ``"val"`` datasets; all share
            ``classes``.
        classes: Class names; the datasets' labels index into this list.
        layout: What was found, one of :data:`LAYOUTS`.
        split: JSON-able record of the splits, for a results file: ``path``, ``layout``,
            ``seed``, the requested ``test_fraction`` and ``val_fraction``, ``classes``,
            ``skipped`` (unreadable files left out) and, per split under ``"splits"``, its
            ``source`` (``"folder"`` with its ``folder``, ``"carved"`` from another split with
            ``method`` and ``fraction``, or ``"remainder"`` of a split something was carved
            from), its ``size`` and ``class_counts``, and for carved and remainder splits
            their ``files``, relative to the folder (or the CSV's folder), so that the split
            can be reproduced without kdkit.
    """

    splits: dict[str, ImageTensorDataset]
    classes: list[str]
    layout: str
    split: dict[str, Any] = field(repr=False)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(dataset)}" for name, dataset in self.splits.items())
        return f"ImageData({self.layout!r}, classes={self.classes}, {sizes})"


# --------------------------------------------------------------------------- listing


@dataclass
class _Listing:
    """What was found, before decoding: files and labels of each source split."""

    layout: str
    root: Path  # the relative paths of the record are relative to it
    classes: list[str]
    files: dict[str, list[Path]]  # source split ("train", "test", "val", or "all") -> files
    labels: dict[str, np.ndarray]  # source split -> class index of each file
    folders: dict[str, str] = field(default_factory=dict)  # split -> its folder (folder layouts)
    groups: np.ndarray | None = None  # group of each file of "all" (CSV with a group column)
    csv_path: Path | None = None
    relative: list[str] | None = None  # each file of "all" as the CSV writes it


def _fail(where: str, problems: Sequence[str], advice: str = "") -> ImageDataError:
    """One error listing ``problems`` (capped) found in ``where``."""
    if len(problems) == 1:
        message = f"{where}: {problems[0]}"
    else:
        listed = "".join(f"\n  - {problem}" for problem in problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        message = f"{where}: {len(problems)} problems:{listed}{more}"
    return ImageDataError(f"{message}{advice}")


def _visible(folder: Path) -> tuple[list[Path], list[Path]]:
    """Non-hidden subfolders and files of ``folder``, each sorted."""
    entries = sorted(entry for entry in folder.iterdir() if not _data._is_hidden(entry))
    return [entry for entry in entries if entry.is_dir()], [entry for entry in entries if entry.is_file()]


def _names(paths: Sequence[Path], limit: int = 8) -> str:
    shown = ", ".join(f"{path.name}/" if path.is_dir() else path.name for path in paths[:limit])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


def _what_is_in(folder: Path, extensions: frozenset[str]) -> str:
    """A description of a folder's content, for errors."""
    subfolders, files = _visible(folder)
    images = [file for file in files if file.suffix.lower() in extensions]
    others = [file for file in files if file.suffix.lower() not in extensions]
    parts = []
    if subfolders:
        parts.append(f"subfolders {_names(subfolders)}")
    if images:
        parts.append(f"{len(images)} image file(s) ({_names(images, 3)})")
    if others:
        parts.append(f"other files {_names(others)}")
    return "; ".join(parts) if parts else "nothing"


_EXPECTED_LAYOUTS = (
    "expected either train/ and test/ (or Training/ and Testing/, optionally val/) folders each "
    "holding one folder per class, or one folder per class (<class>/<image>), or a CSV file of "
    "path,label[,group] passed as the path"
)


def _class_images(split_dir: Path, extensions: frozenset[str], problems: list[str]) -> dict[str, list[Path]]:
    """``class name -> images`` of ``split_dir/<class>/``, as :func:`kdkit.data.load_imagefolder`
    lists them; problems with class folders are appended to ``problems``."""
    class_dirs, loose = _visible(split_dir)
    if not class_dirs:
        loose_images = [file for file in loose if file.suffix.lower() in extensions]
        found = _what_is_in(split_dir, extensions)
        hint = " (if a CSV file gives their labels, pass the CSV file)" if loose_images else ""
        problems.append(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>, found {found}{hint}")
        return {}
    if images_here := [file for file in loose if file.suffix.lower() in extensions]:
        logger.warning(
            "Ignoring %d image file(s) directly in %s (not in a class folder), e.g. %s",
            len(images_here),
            split_dir,
            images_here[0].name,
        )
    by_class = {}
    for class_dir in class_dirs:
        images = [file for file in _visible(class_dir)[1] if file.suffix.lower() in extensions]
        if not images:
            problems.append(f"class folder {class_dir} holds no images (found {_what_is_in(class_dir, extensions)})")
        elif len(images) == 1:
            problems.append(
                f"class folder {class_dir} holds a single image ({images[0].name}); a class needs at least 2"
            )
        by_class[class_dir.name] = images
    return by_class


def _check_same_classes(root: Path, found: Mapping[str, Mapping[str, list[Path]]], folders: Mapping[str, Path]) -> None:
    """Every split folder must hold the same class folders, and no two may differ only in case."""
    all_names = sorted({name for classes in found.values() for name in classes})
    problems = []
    by_folded = defaultdict(set)
    for name in all_names:
        by_folded[name.casefold()].add(name)
    reported = set()
    for spellings in by_folded.values():
        if len(spellings) > 1:
            where = [
                (f"{folders[split].name}/{name}" if folders[split] != root else f"{name}/")
                for split, classes in found.items()
                for name in sorted(spellings)
                if name in classes
            ]
            problems.append(
                f"class folders {' and '.join(where)} differ only in case; rename them to one spelling"
            )
            reported |= spellings
    for name in all_names:
        if name in reported:
            continue
        has = [split for split, classes in found.items() if name in classes]
        lacks = [split for split in found if split not in has]
        if lacks:
            problems.append(
                f"class {name!r} has a folder in {', '.join(folders[s].name + '/' for s in has)} but none in "
                f"{', '.join(folders[s].name + '/' for s in lacks)} (every split needs every class)"
            )
    if problems:
        raise _fail(f"Class folders of {root}" + (" differ between splits" if len(found) > 1 else ""), problems)


def _refuse_single_class(root: Path, classes: Sequence[str], class_dir: Path) -> None:
    if len(classes) >= 2:
        return
    hint = ""
    if inner := _visible(class_dir)[0]:
        hint = f"; {class_dir} itself holds folders {_names(inner)}: did you mean to pass {class_dir}?"
    raise ImageDataError(
        f"{root} holds a single class {classes[0]!r}; classification needs at least two classes{hint}"
    )


def _list_folder(root: Path) -> _Listing:
    extensions = _data._image_extensions()
    subfolders, files = _visible(root)
    by_lower = defaultdict(list)
    for folder in subfolders:
        by_lower[folder.name.lower()].append(folder)
    split_folders: dict[str, Path] = {}
    problems = []
    for split, aliases in _data._SPLIT_FOLDER_ALIASES.items():
        matches = [folder for alias in aliases for folder in by_lower.get(alias, ())]
        if len(matches) > 1:
            problems.append(f"{' and '.join(f.name + '/' for f in matches)} both look like the {split} split")
        elif matches:
            split_folders[split] = matches[0]
    if problems:
        raise _fail(str(root), problems, "; keep one of them")

    if split_folders:
        if "train" not in split_folders:
            found = ", ".join(folder.name + "/" for folder in split_folders.values())
            raise ImageDataError(
                f"{root} has {found} but no training folder (train/ or Training/); {_EXPECTED_LAYOUTS}. "
                "(Split names are reserved: if these are class folders, rename them.)"
            )
        others = [folder for folder in subfolders if folder not in split_folders.values()]
        if others:
            logger.warning("Ignoring folders of %s that are not splits: %s", root, _names(others))
        found: dict[str, dict[str, list[Path]]] = {}
        for split, folder in split_folders.items():
            found[split] = _class_images(folder, extensions, problems)
        if problems:
            raise _fail(f"Image folder {root}", problems)
        _check_same_classes(root, found, split_folders)
        classes = sorted(found["train"])
        _refuse_single_class(root, classes, split_folders["train"] / classes[0])
        return _folder_listing("split folders", root, classes, found, {s: f.name for s, f in split_folders.items()})

    if not subfolders:
        csv_files = [file for file in files if file.suffix.lower() == ".csv"]
        hint = f". If {csv_files[0].name} lists the images, pass its path instead" if csv_files else ""
        raise ImageDataError(
            f"{root} is not an image data set: it holds no subfolders; found {_what_is_in(root, extensions)}; "
            f"{_EXPECTED_LAYOUTS}{hint}"
        )
    by_class = _class_images(root, extensions, problems)
    if problems:
        # Folders of folders instead of images: perhaps the data set is one level down.
        nested = [folder for folder in subfolders if not by_class.get(folder.name) and _visible(folder)[0]]
        hint = f"\n({_EXPECTED_LAYOUTS}" if nested else ""
        if len(subfolders) == 1 and nested:
            hint += f"; did you mean to pass {nested[0]}?"
        raise _fail(f"Image folder {root} (read as one folder per class)", problems, hint + (")" if hint else ""))
    _check_same_classes(root, {"train": by_class}, {"train": root})
    classes = sorted(by_class)
    _refuse_single_class(root, classes, root / classes[0])
    return _folder_listing("class folders", root, classes, {"train": by_class}, {"train": "."})


def _folder_listing(
    layout: str, root: Path, classes: list[str], found: Mapping[str, Mapping[str, list[Path]]], folders: dict[str, str]
) -> _Listing:
    files, labels = {}, {}
    for split, by_class in found.items():
        # The order of load_imagefolder: classes sorted, then files sorted within each class.
        files[split] = [file for name in classes for file in by_class[name]]
        labels[split] = np.array([index for index, name in enumerate(classes) for _ in by_class[name]], dtype=np.int64)
    if layout == "class folders":
        files = {"all": files.pop("train")}
        labels = {"all": labels.pop("train")}
    return _Listing(layout, root, classes, files, labels, folders)


def _sort_labels(labels: set[str]) -> list[str]:
    # Integer labels in numeric order, so that "0".."9" map to class indices 0..9 (not "10" < "2").
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))  # "1" and "01": a fixed order
    return sorted(labels)


def _list_csv(csv_path: Path) -> _Listing:
    root = csv_path.parent
    with csv_path.open(newline="", encoding="utf-8-sig") as stream:
        head = stream.readline()
        try:
            dialect = csv.Sniffer().sniff(head, delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel
        stream.seek(0)
        reader = csv.reader(stream, dialect)
        header = next(reader, None)
        if header is None:
            raise ImageDataError(f"{csv_path} is empty; expected a header row path,label[,group] and one row per image")
        columns = [name.strip().lower() for name in header]
        missing = [name for name in ("path", "label") if name not in columns]
        if missing:
            raise ImageDataError(
                f"{csv_path} lacks the column(s) {', '.join(missing)}: found columns {[name.strip() for name in header]}; "
                "expected a header row path,label (optionally group), paths relative to the CSV's folder"
            )
        repeated = sorted({name for name in columns if name in CSV_COLUMNS and columns.count(name) > 1})
        if repeated:
            raise ImageDataError(f"{csv_path} has the column(s) {', '.join(repeated)} more than once")
        position = {name: columns.index(name) for name in CSV_COLUMNS if name in columns}
        # Rows numbered as in a spreadsheet: the header is row 1.
        rows = [(number, row) for number, row in enumerate(reader, start=2) if any(cell.strip() for cell in row)]
    if not rows:
        raise ImageDataError(f"{csv_path} lists no images (a header and no rows)")

    extensions = _data._image_extensions()
    problems, missing_files = [], []
    records = []  # (row number, relative path text, absolute path, label, group)
    seen: dict[Path, int] = {}
    for number, row in rows:
        cells = {name: (row[index].strip() if index < len(row) else "") for name, index in position.items()}
        empty = [name for name, value in cells.items() if not value]
        if empty:
            problems.append(f"row {number}: empty {' and '.join(empty)} ({','.join(row)})")
            continue
        relative = Path(cells["path"])
        path = (root / relative).resolve()
        if (first := seen.get(path)) is not None:
            problems.append(f"row {number}: {cells['path']} is listed again (first on row {first})")
            continue
        seen[path] = number
        if not path.is_file():
            missing_files.append(f"row {number}: {cells['path']} (looked for {path})")
        elif path.suffix.lower() not in extensions:
            problems.append(f"row {number}: {cells['path']} is not an image file Pillow can read ({path.suffix or 'no extension'})")
        records.append((number, relative.as_posix(), path, cells["label"], cells.get("group")))
    if missing_files:
        problems = [*missing_files, *problems]
        raise _fail(f"{csv_path}: {len(missing_files)} listed file(s) do not exist", problems)
    if problems:
        raise _fail(str(csv_path), problems)

    counts = Counter(record[3] for record in records)
    first_row = {}
    for number, _, _, label, _ in records:
        first_row.setdefault(label, number)
    by_folded = defaultdict(list)
    for label in counts:
        by_folded[label.casefold()].append(label)
    problems = [
        "labels " + " and ".join(f"{label!r} (row {first_row[label]})" for label in sorted(spellings))
        + " differ only in case; use one spelling"
        for spellings in by_folded.values()
        if len(spellings) > 1
    ]
    case_variants = {label for spellings in by_folded.values() if len(spellings) > 1 for label in spellings}
    for label, count in sorted(counts.items()):
        if count == 1 and label not in case_variants:
            others = [other for other, n in counts.items() if n > 1]
            close = difflib.get_close_matches(label, others, n=1)
            guess = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(
                f"label {label!r} occurs only once (row {first_row[label]}): a class needs at least 2 images{guess}"
            )
    if problems:
        raise _fail(str(csv_path), problems)
    classes = _sort_labels(set(counts))
    if len(classes) < 2:
        raise ImageDataError(f"{csv_path} has a single label {classes[0]!r}; classification needs at least two classes")

    index = {name: position for position, name in enumerate(classes)}
    listing = _Listing(
        "csv",
        root,
        classes,
        {"all": [record[2] for record in records]},
        {"all": np.array([index[record[3]] for record in records], dtype=np.int64)},
        csv_path=csv_path,
        relative=[record[1] for record in records],
    )
    if "group" in position:
        listing.groups = np.array([record[4] for record in records], dtype=object)
    return listing


def _check_enough_per_class(listing: _Listing, pool: str, where: str, splits: Sequence[str]) -> None:
    """Every class of ``pool`` needs an image (of its own group, with groups) for each of ``splits``."""
    labels, needed = listing.labels[pool], len(splits)
    groups = listing.groups if pool == "all" else None
    sides = f"{', '.join(splits[:-1])} and {splits[-1]}"
    problems = []
    for index, name in enumerate(listing.classes):
        in_class = labels == index
        if groups is not None:
            class_groups = sorted(set(groups[in_class]))
            if len(class_groups) < needed:
                problems.append(
                    f"the {int(in_class.sum())} images of class {name!r} belong to {len(class_groups)} group(s) "
                    f"({', '.join(map(repr, class_groups[:5]))}); {sides} need {needed} groups of it"
                )
        elif 1 < in_class.sum() < needed:
            problems.append(f"class {name!r} has {int(in_class.sum())} images; {sides} need at least {needed}")
    if problems:
        no_val = " or pass val_fraction=None (no validation split)" if "val" in splits else ""
        kind = "images of other groups (patients)" if groups is not None else "images"
        raise _fail(f"Too few images of a class in {where}", problems, f"; add {kind}{no_val}")


# --------------------------------------------------------------------------- carving


def _fraction_advice(fraction_name: str, counts: Mapping[str, int]) -> str:
    needed = max(1 / count for count in counts.values())
    return f"raise {fraction_name} to at least {math.ceil(needed * 100) / 100:.2f} or add images"


@dataclass(frozen=True)
class _Carve:
    """One split carved from a pool of images, for the messages and the record."""

    split: str  # "test" or "val"
    fraction: float
    fraction_name: str  # "test_fraction" or "val_fraction"
    pool: str  # what it is carved from, e.g. "the images of Training/"


def _check_represented(labels: np.ndarray, keep: np.ndarray, carved: np.ndarray, classes: Sequence[str], carve: _Carve) -> None:
    problems, short = [], {}
    for index, name in enumerate(classes):
        total = int((labels == index).sum())
        if not total:
            continue
        if not (labels[carved] == index).any():
            problems.append(f"class {name!r} ({total} of {carve.pool}) gets no {carve.split} image")
            short[name] = total
        elif not (labels[keep] == index).any():
            problems.append(f"class {name!r} ({total} of {carve.pool}) keeps no train image")
    if problems:
        advice = f"; {_fraction_advice(carve.fraction_name, short)}" if short else f"; lower {carve.fraction_name} or add images"
        raise _fail(f"{carve.fraction_name}={carve.fraction} leaves a class out of a split", problems, advice)


def _check_carvable(labels: np.ndarray, classes: Sequence[str], carve: _Carve) -> None:
    single = [classes[index] for index, count in enumerate(np.bincount(labels, minlength=len(classes))) if count == 1]
    if single:
        raise _fail(
            f"Cannot carve {carve.split} images from {carve.pool}",
            [f"class {name!r} has a single image there" for name in single],
            f"; a class needs at least 2 to be in both train and {carve.split}",
        )


def _sklearn_refused(
    carve: _Carve, labels: np.ndarray, classes: Sequence[str], error: ValueError, *, groups: int | None = None
) -> ImageDataError:
    counts = np.bincount(labels, minlength=len(classes))
    listed = ", ".join(f"{name!r} {count}" for name, count in zip(classes, counts) if count)
    of_groups = f" in {groups} groups" if groups is not None else ""
    return ImageDataError(
        f"Cannot carve {carve.split} images ({carve.fraction_name}={carve.fraction}) from {carve.pool}: "
        f"its {len(labels)} images{of_groups} (by class: {listed}) are too few for this split, as "
        f"sklearn says: {error}; change {carve.fraction_name} or add images"
    )


def _stratified_carve(
    labels: np.ndarray, seed: int, classes: Sequence[str], carve: _Carve
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Positions kept and carved off (each sorted), by a stratified split of ``carve.fraction``."""
    _check_carvable(labels, classes, carve)
    counts = {classes[index]: int(count) for index, count in enumerate(np.bincount(labels)) if count}
    carved_count = math.ceil(carve.fraction * len(labels))  # as train_test_split rounds
    for side, size in ((carve.split, carved_count), ("train", len(labels) - carved_count)):
        if size < len(counts):
            # train_test_split refuses; say which classes would miss out.
            share = carve.fraction if side == carve.split else 1 - carve.fraction
            short = {name: count for name, count in counts.items() if share * count < 1} or counts
            raise _fail(
                f"{carve.fraction_name}={carve.fraction} leaves {size} of the {len(labels)} images of {carve.pool} "
                f"for {side}, fewer than the {len(counts)} classes",
                [f"class {name!r} ({count} images) would get no {side} image" for name, count in sorted(short.items())],
                f"; {_fraction_advice(carve.fraction_name, short)}" if side == carve.split else f"; lower {carve.fraction_name}",
            )
    try:
        keep, carved = train_test_split(
            np.arange(len(labels)), test_size=carve.fraction, stratify=labels, random_state=seed
        )
    except ValueError as error:  # a case the checks above do not foresee: named all the same
        raise _sklearn_refused(carve, labels, classes, error) from error
    keep, carved = np.sort(keep), np.sort(carved)
    _check_represented(labels, keep, carved, classes, carve)
    return keep, carved, {"method": "stratified (sklearn train_test_split)"}


def _fold_plan(fraction: float, max_folds: int) -> tuple[int, int]:
    """``(k, m)``: ``m`` of ``k`` folds give the fraction nearest ``fraction``, smallest ``k`` first."""
    best = None
    for folds in range(2, max_folds + 1):
        taken = min(max(round(fraction * folds), 1), folds - 1)
        error = abs(taken / folds - fraction)
        if best is None or error < best[0] - 1e-12:
            best = (error, folds, taken)
        if error <= _FOLD_FRACTION_TOLERANCE:
            return folds, taken
    return best[1], best[2]


def _group_carve(
    labels: np.ndarray, groups: np.ndarray, seed: int, classes: Sequence[str], carve: _Carve
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Whole groups carved off, about ``carve.fraction`` of the images, the classes' proportions
    kept as far as the groups allow (sklearn's ``StratifiedGroupKFold``)."""
    _check_carvable(labels, classes, carve)
    group_ids = np.unique(groups, return_inverse=True)[1]
    for index, name in enumerate(classes):
        in_class = labels == index
        if in_class.any() and len(np.unique(group_ids[in_class])) < 2:
            group = groups[in_class][0]
            raise _fail(
                f"Cannot carve {carve.split} images from {carve.pool}",
                [f"the {int(in_class.sum())} images of class {name!r} there all belong to group {group!r}"],
                f"; a class needs images of at least 2 groups to be in both train and {carve.split}",
            )
    num_groups = int(group_ids.max()) + 1
    folds, taken = _fold_plan(carve.fraction, min(_MAX_FOLDS, num_groups, int(np.bincount(labels).max())))
    with warnings.catch_warnings():
        # "The least populated class in y has only n members": checked below, by class name.
        warnings.simplefilter("ignore", UserWarning)
        try:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            fold_sets = [test for _, test in splitter.split(np.zeros(len(labels)), labels, group_ids)]
        except ValueError as error:  # a case the checks above do not foresee: named all the same
            raise _sklearn_refused(carve, labels, classes, error, groups=num_groups) from error
    # Which folds to take: the most classes represented, then the size nearest the fraction.
    present = len(np.unique(labels))
    target = carve.fraction * len(labels)
    chosen: list[int] = []
    carved = np.empty(0, dtype=np.int64)
    for step in range(1, taken + 1):

        def score(fold: int, carved: np.ndarray = carved, step: int = step) -> tuple[int, float, int]:
            union = np.concatenate([carved, fold_sets[fold]])
            left = np.ones(len(labels), dtype=bool)
            left[union] = False
            missing = 2 * present - len(np.unique(labels[union])) - len(np.unique(labels[left]))
            return missing, abs(len(union) - target * step / taken), fold

        best = min((fold for fold in range(folds) if fold not in chosen), key=score)
        chosen.append(best)
        carved = np.concatenate([carved, fold_sets[best]])
    carved = np.sort(carved)
    keep = np.setdiff1d(np.arange(len(labels)), carved)
    _check_represented(labels, keep, carved, classes, carve)
    return keep, carved, {
        "method": "stratified by group (sklearn StratifiedGroupKFold)",
        "folds": folds,
        "folds_taken": sorted(chosen),
        "groups": {carve.split: len(np.unique(group_ids[carved])), "left": len(np.unique(group_ids[keep]))},
    }


# --------------------------------------------------------------------------- decoding


def _decode_csv(listing: _Listing, image_size: int, cache_dir, on_corrupt: OnCorrupt, progress: bool) -> ImageTensorDataset:
    """All images of a CSV listing, decoded once and cached like :func:`kdkit.data.load_imagefolder`'s."""
    paths = listing.files["all"]
    name = f"{listing.root.name}-{listing.csv_path.stem}"
    cache = _data._cache_file(cache_dir, name, [("all", path) for path in paths], image_size)
    payload = _data._read_cache(cache)
    if payload is None:
        images, kept, skipped = _data._decode_images(
            paths, image_size, on_corrupt=on_corrupt, progress=progress, description=f"Decoding {listing.csv_path.name}"
        )
        payload = {"images": images, "kept": torch.from_numpy(kept), "skipped": skipped}
        _data._write_cache(cache, payload)
    else:
        _data._report_cached_skips(payload["skipped"], on_corrupt, cache)
    kept = payload["kept"].numpy()
    return ImageTensorDataset(
        payload["images"],
        listing.labels["all"][kept],
        listing.classes,
        paths=[str(paths[position]) for position in kept.tolist()],
        skipped=payload["skipped"],
    )


def _decode_folders(listing: _Listing, image_size: int, cache_dir, on_corrupt: OnCorrupt, progress: bool) -> dict[str, ImageTensorDataset]:
    loaded = _data.load_imagefolder(
        listing.root, image_size, splits=listing.folders, cache_dir=cache_dir, on_corrupt=on_corrupt, progress=progress
    )
    if "all" in listing.files:
        loaded = {"all": loaded["train"]}
    for split, dataset in loaded.items():
        listed = {str(path) for path in listing.files[split]}
        if dataset.classes != listing.classes or set(dataset.paths) | set(dataset.skipped) != listed:
            raise ImageDataError(f"The files of {listing.root} changed while loading; load again")
    return loaded


def _positions(dataset: ImageTensorDataset, files: Sequence[Path]) -> np.ndarray:
    """Positions in ``dataset`` of ``files`` (those that were decoded), in ``files`` order."""
    where = {path: position for position, path in enumerate(dataset.paths)}
    return np.array([where[str(file)] for file in files if str(file) in where], dtype=np.int64)


# --------------------------------------------------------------------------- entry point


def _check_arguments(image_size: int, test_fraction: float, val_fraction: float | None, on_corrupt: str) -> None:
    _data._check_on_corrupt(on_corrupt)
    if not isinstance(image_size, numbers.Integral) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1) or be None, got {val_fraction}")


def load_image_data(
    path: str | os.PathLike,
    image_size: int,
    *,
    test_fraction: float = 0.2,
    val_fraction: float | None = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    on_corrupt: OnCorrupt = "error",
    progress: bool = True,
) -> ImageData:
    """Load a data set from a folder or a CSV file into train, test and validation splits.

    The layout is recognised from ``path`` (see the module docstring):

    * a folder with ``train/`` and ``test/`` (or ``Training/`` and ``Testing/``, any case, and
      optionally ``val/``, ``valid/`` or ``validation/``) folders of class folders: their
      splits; a missing test (validation) folder is carved from the training folder;
    * a folder of class folders: ``test_fraction`` of the images carved off for test, then
      ``val_fraction`` of the rest for validation, both by a seeded stratified split;
    * a ``.csv`` file with a header ``path,label`` and optionally ``group`` (paths relative to
      the CSV's folder): test and validation carved in the same way, except that with a
      ``group`` column whole groups are carved off (sklearn's ``StratifiedGroupKFold``: ``m``
      of ``k`` folds, ``m / k`` nearest the fraction), so one patient's images never lie on
      both sides of a split.

    Class names are the class folder names, or the CSV labels, sorted (integer labels
    numerically). Images are decoded once, converted to RGB, resized to ``image_size`` and
    cached as :func:`kdkit.data.load_imagefolder` does, which also gives the rule by which
    images of more than 8 bits (16-bit PNG and TIFF, float TIFF) are scaled to 0..255; no
    ``datasets`` (Hugging Face) cache or progress bar is involved.

    Every check runs before decoding: empty class folders or ones with a single image, class
    folders that differ between splits (also in case only), a single class, CSV columns,
    rows whose file is missing, repeated paths, labels that differ only in case or that occur
    once (with the nearest other label suggested), classes all in one group, and fractions
    that leave a class without a test, validation or training image. Each raises
    :class:`ImageDataError` naming the folder, file, row (the header is row 1) or class.

    Args:
        path: The data set folder, or its CSV file.
        image_size: Side of the square images.
        test_fraction: Share of the images carved off for test when there is no test folder.
        val_fraction: Share of the remaining training images carved off for validation when
            there is no validation folder; 0 or None for no validation split.
        seed: Seed of the carved splits; the same seed and files give the same splits.
        cache_dir: Decoded-image cache folder; default ``$KDKIT_CACHE_DIR`` or ``~/.cache/kdkit``.
        on_corrupt: ``"error"`` raises :class:`kdkit.data.CorruptImageError` naming an
            unreadable file (truncated, not an image, NaN pixels, or a possible decompression
            bomb); ``"skip"`` leaves it out (splits are drawn over all listed files,
            so they do not depend on which files decode) and records it in ``split["skipped"]``.
        progress: Show a progress bar while decoding.

    Returns:
        The splits, classes, layout and a JSON-able record of the split.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageDataError: The data set cannot be used as it is (see above), or, with
            ``on_corrupt="skip"``, unreadable files leave a class out of a split.
        kdkit.data.CorruptImageError: An unreadable image with ``on_corrupt="error"``.
    """
    _check_arguments(image_size, test_fraction, val_fraction, on_corrupt)
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"Data set {source} does not exist; {_EXPECTED_LAYOUTS}")
    source = source.resolve()
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise ImageDataError(f"{source} is a file but not a .csv file; {_EXPECTED_LAYOUTS}")
        listing = _list_csv(source)
    else:
        listing = _list_folder(source)

    plan = _plan_splits(listing, test_fraction, val_fraction, seed)
    logger.info(
        "%s: %s layout, classes %s, %s",
        source,
        listing.layout,
        listing.classes,
        ", ".join(f"{name} {len(files)}" for name, (_, files) in plan["files"].items()),
    )

    if listing.layout == "csv":
        decoded = {"all": _decode_csv(listing, image_size, cache_dir, on_corrupt, progress)}
    else:
        decoded = _decode_folders(listing, image_size, cache_dir, on_corrupt, progress)
    splits = {}
    for name, (from_split, files) in plan["files"].items():
        dataset = decoded[from_split]
        splits[name] = dataset if plan["records"][name]["source"] == "folder" else dataset.subset(_positions(dataset, files))
    skipped = sorted({path for dataset in decoded.values() for path in dataset.skipped})
    if skipped:
        _check_after_skips(splits, skipped)
    record = _record(listing, source, plan, splits, skipped, test_fraction, val_fraction, seed)
    return ImageData(splits=splits, classes=list(listing.classes), layout=listing.layout, split=record)


def _plan_splits(listing: _Listing, test_fraction: float, val_fraction: float | None, seed: int) -> dict:
    """Which files go to which split (before decoding), and how each split was made."""
    records: dict[str, dict] = {}
    files: dict[str, tuple[str, list[Path]]] = {}  # split -> (decoded set it is taken from, its files)
    for split in listing.files.keys() & listing.folders.keys():
        records[split] = {"source": "folder", "folder": listing.folders[split]}
        files[split] = (split, listing.files[split])
    pool = "all" if "all" in listing.files else "train"
    pool_files, pool_labels = listing.files[pool], listing.labels[pool]
    pool_name = "the data set" if pool == "all" else f"the images of {listing.folders['train']}/"
    remaining = np.arange(len(pool_files))
    carves = []
    if "test" not in listing.files:
        carves.append(("test", test_fraction, "test_fraction"))
    if "val" not in listing.files and val_fraction:
        carves.append(("val", val_fraction, "val_fraction"))
    if carves:
        _check_enough_per_class(listing, pool, pool_name, ["train", *(carve[0] for carve in carves)])
    for split, fraction, fraction_name in carves:
        where = pool_name if len(remaining) == len(pool_files) else f"{pool_name} left after carving test"
        carve = _Carve(split, fraction, fraction_name, where)
        labels = pool_labels[remaining]
        if listing.groups is not None:
            keep, carved, how = _group_carve(labels, listing.groups[remaining], seed, listing.classes, carve)
        else:
            keep, carved, how = _stratified_carve(labels, seed, listing.classes, carve)
        records[split] = {"source": "carved", "from": where.removeprefix("the "), "fraction": fraction, **how}
        files[split] = (pool, [pool_files[position] for position in remaining[carved]])
        remaining = remaining[keep]
    if carves:
        records["train"] = {"source": "remainder", "from": pool_name.removeprefix("the ")}
        files["train"] = (pool, [pool_files[position] for position in remaining])
    order = [name for name in ("train", "val", "test") if name in files]
    return {"files": {name: files[name] for name in order}, "records": {name: records[name] for name in order}}


def _check_after_skips(splits: Mapping[str, ImageTensorDataset], skipped: Sequence[str]) -> None:
    problems = [
        f"{name} has no readable image of class {class_name!r}"
        for name, dataset in splits.items()
        for class_name, count in dataset.class_counts().items()
        if not count
    ]
    if problems:
        raise _fail(
            f"After leaving out {len(skipped)} unreadable file(s) (e.g. {skipped[0]})", problems, "; fix or replace them"
        )


def _record(
    listing: _Listing,
    source: Path,
    plan: dict,
    splits: Mapping[str, ImageTensorDataset],
    skipped: Sequence[str],
    test_fraction: float,
    val_fraction: float | None,
    seed: int,
) -> dict[str, Any]:
    relative_of = dict(zip(map(str, listing.files.get("all", ())), listing.relative or ()))

    def relative(path: str) -> str:
        if path in relative_of:
            return relative_of[path]
        try:
            return Path(path).relative_to(listing.root).as_posix()
        except ValueError:
            return path

    split_records = {}
    for name, dataset in splits.items():
        entry = {**plan["records"][name], "size": len(dataset), "class_counts": dataset.class_counts()}
        if entry["source"] != "folder":
            entry["files"] = [relative(path) for path in dataset.paths]
        split_records[name] = entry
    return {
        "path": str(source),
        "layout": listing.layout,
        "classes": list(listing.classes),
        "seed": seed,
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
        "splits": split_records,
        "skipped": [relative(path) for path in skipped],
    }
