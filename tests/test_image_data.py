"""Tests for kdkit.image_data: a user's data set from a folder or a CSV file, its layouts,
carved splits (stratified, grouped, seeded, recorded) and the errors on bad data, which come
before any image is decoded."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit import data
from kdkit.data import CorruptImageError, load_imagefolder
from kdkit.image_data import ImageData, ImageDataError, load_image_data

SIZE = 8
CLASSES = ["cat", "dog", "owl"]


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _class_folders(root: Path, counts: dict[str, int], *, suffix: str = ".png", seed: int = 0) -> Path:
    for offset, (name, count) in enumerate(counts.items()):
        for index in range(count):
            _image(root / name / f"{name}_{index:02d}{suffix}", seed + 100 * offset + index)
    return root


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _patients_csv(root: Path) -> Path:
    """18 patients, 2-4 images each; patients 0-5 cat, 6-11 dog, 12-17 owl, and two patients
    with images of two classes."""
    rows = []
    for patient in range(18):
        for image in range(2 + patient % 3):
            label = CLASSES[patient // 6]
            if patient in (4, 10) and image == 0:
                label = CLASSES[(patient // 6 + 1) % 3]
            relative = f"images/p{patient:02d}_{image}.png"
            _image(root / relative, 1000 + 10 * patient + image)
            rows.append([relative, label, f"patient{patient:02d}"])
    return _write_csv(root / "labels.csv", ["path", "label", "group"], rows)


def _load(path: Path, tmp_path: Path, **kwargs) -> ImageData:
    return load_image_data(path, SIZE, cache_dir=tmp_path / "cache", progress=False, **kwargs)


@pytest.fixture
def no_decoding(monkeypatch):
    """Bad data must be refused before any image is decoded."""

    def refuse(*args, **kwargs):
        raise AssertionError("decoded images although the data set should have been refused")

    monkeypatch.setattr(data, "_decode_images", refuse)


def _split_files(loaded: ImageData) -> dict[str, list[str]]:
    return {name: list(dataset.paths) for name, dataset in loaded.splits.items()}


def _assert_disjoint_and_complete(loaded: ImageData, expected: int) -> None:
    files = _split_files(loaded)
    every = [path for paths in files.values() for path in paths]
    assert len(every) == len(set(every)) == expected


# --------------------------------------------------------------------------- layouts


def test_split_folders_keep_their_splits_and_carve_validation_from_train(tmp_path):
    root = tmp_path / "pets"
    _class_folders(root / "train", {name: 10 for name in CLASSES})
    _class_folders(root / "test", {name: 3 for name in CLASSES}, seed=50)
    loaded = _load(root, tmp_path)

    assert loaded.layout == "split folders" and loaded.classes == CLASSES
    assert list(loaded.splits) == ["train", "val", "test"]
    assert {name: len(dataset) for name, dataset in loaded.splits.items()} == {"train": 27, "val": 3, "test": 9}
    assert loaded.splits["val"].class_counts() == {"cat": 1, "dog": 1, "owl": 1}
    assert loaded.splits["train"].images.shape == (27, 3, SIZE, SIZE)
    assert loaded.splits["train"].images.dtype == torch.uint8
    _assert_disjoint_and_complete(loaded, 39)

    record = loaded.split
    json.dumps(record)  # JSON-able as it is
    assert record["layout"] == "split folders" and record["seed"] == 0
    assert record["splits"]["test"] == {"source": "folder", "folder": "test", "size": 9, "class_counts": dict.fromkeys(CLASSES, 3)}
    assert record["splits"]["val"]["source"] == "carved" and record["splits"]["val"]["fraction"] == 0.1
    assert record["splits"]["train"]["source"] == "remainder"
    # Carved splits list their files relative to the folder, in the datasets' order.
    for name in ("train", "val"):
        assert record["splits"][name]["files"] == [
            Path(path).relative_to(root.resolve()).as_posix() for path in loaded.splits[name].paths
        ]
    assert record["splits"]["val"]["files"][0].startswith("train/")


def test_kaggle_spelling_with_a_validation_folder_carves_nothing(tmp_path):
    root = tmp_path / "mri"
    for split, count in (("Training", 4), ("Validation", 2), ("TESTING", 2)):
        _class_folders(root / split, {name: count for name in CLASSES}, seed=len(split))
    loaded = _load(root, tmp_path)

    assert {name: len(dataset) for name, dataset in loaded.splits.items()} == {"train": 12, "val": 6, "test": 6}
    assert {name: entry["source"] for name, entry in loaded.split["splits"].items()} == dict.fromkeys(
        ("train", "val", "test"), "folder"
    )
    assert [entry["folder"] for entry in loaded.split["splits"].values()] == ["Training", "Validation", "TESTING"]
    assert all("files" not in entry for entry in loaded.split["splits"].values())


def test_split_folders_share_load_imagefolders_cache_and_order(tmp_path, monkeypatch):
    root = tmp_path / "mri"
    _class_folders(root / "Training", {name: 4 for name in CLASSES})
    _class_folders(root / "Testing", {name: 2 for name in CLASSES}, seed=9)
    direct = load_imagefolder(
        root, SIZE, splits={"train": "Training", "test": "Testing"}, cache_dir=tmp_path / "cache", progress=False
    )
    monkeypatch.setattr(data, "_decode_images", lambda *args, **kwargs: pytest.fail("cache not shared"))
    loaded = _load(root, tmp_path, val_fraction=None)
    assert list(loaded.splits) == ["train", "test"]
    for name in ("train", "test"):
        assert loaded.splits[name].paths == direct[name].paths
        assert torch.equal(loaded.splits[name].images, direct[name].images)
        assert torch.equal(loaded.splits[name].labels, direct[name].labels)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_class_folders_are_split_stratified_disjoint_and_seeded(tmp_path):
    root = _class_folders(tmp_path / "pets", {"cat": 10, "dog": 15, "owl": 20})
    loaded = _load(root, tmp_path)

    assert loaded.layout == "class folders" and loaded.classes == CLASSES
    # test: ceil(0.2 * 45) = 9, by class 2/3/4; val: ceil(0.1 * 36) = 4 of the rest.
    assert loaded.splits["test"].class_counts() == {"cat": 2, "dog": 3, "owl": 4}
    assert len(loaded.splits["val"]) == 4 and min(loaded.splits["val"].class_counts().values()) >= 1
    assert len(loaded.splits["train"]) == 32
    _assert_disjoint_and_complete(loaded, 45)
    for name, dataset in loaded.splits.items():  # labels follow the class folder of each file
        assert [loaded.classes[label] for label in dataset.labels.tolist()] == [Path(p).parent.name for p in dataset.paths]
    assert {entry["source"] for entry in loaded.split["splits"].values()} == {"carved", "remainder"}
    assert loaded.split["splits"]["val"]["from"] == "data set left after carving test"

    again = _load(root, tmp_path)
    assert _split_files(again) == _split_files(loaded) and again.split == loaded.split
    other = _load(root, tmp_path, seed=1)
    assert _split_files(other)["test"] != _split_files(loaded)["test"]
    assert other.splits["test"].class_counts() == loaded.splits["test"].class_counts()


def test_without_validation_and_with_other_fractions(tmp_path):
    root = _class_folders(tmp_path / "pets", {name: 10 for name in CLASSES})
    loaded = _load(root, tmp_path, test_fraction=0.3, val_fraction=0)
    assert list(loaded.splits) == ["train", "test"]
    assert loaded.splits["test"].class_counts() == dict.fromkeys(CLASSES, 3)
    assert loaded.split["val_fraction"] == 0


def test_csv_with_groups_never_splits_a_group(tmp_path):
    csv_path = _patients_csv(tmp_path / "clinic")
    loaded = _load(csv_path, tmp_path)
    assert loaded.layout == "csv" and loaded.classes == CLASSES

    with csv_path.open() as stream:
        group_of = {(csv_path.parent / row["path"]).resolve(): row["group"] for row in csv.DictReader(stream)}
    groups = {name: {group_of[Path(path)] for path in dataset.paths} for name, dataset in loaded.splits.items()}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["val"] and not groups["val"] & groups["test"]
    _assert_disjoint_and_complete(loaded, len(group_of))
    for dataset in loaded.splits.values():
        assert min(dataset.class_counts().values()) >= 1

    test = loaded.split["splits"]["test"]
    assert test["method"] == "stratified by group (sklearn StratifiedGroupKFold)" and test["folds"] == 5
    assert 0.1 < test["size"] / len(group_of) < 0.3
    assert test["groups"]["test"] == len(groups["test"])
    # The record writes the paths as the CSV does.
    assert all(path.startswith("images/p") for path in test["files"])
    assert _load(csv_path, tmp_path).split == loaded.split
    assert _load(csv_path, tmp_path, seed=3).split["splits"]["test"]["files"] != test["files"]


@pytest.mark.parametrize("seed", range(4))
def test_group_split_keeps_a_rare_class_on_every_side(tmp_path, seed):
    """40 patients of 3 images; the rare class has 3 patients, so most of the 5 folds lack it:
    the folds taken are those that keep every class on both sides."""
    root = tmp_path / "clinic"
    if not (root / "labels.csv").exists():
        rows = []
        for patient in range(40):
            label = "rare" if patient < 3 else ("a", "b")[patient % 2]
            for image in range(3):
                relative = f"p{patient}_{image}.png"
                _image(root / relative, 10 * patient + image)
                rows.append([relative, label, f"p{patient}"])
        _write_csv(root / "labels.csv", ["path", "label", "group"], rows)
    loaded = _load(root / "labels.csv", tmp_path, seed=seed)
    groups = {name: {Path(p).name.split("_")[0] for p in dataset.paths} for name, dataset in loaded.splits.items()}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["val"] and not groups["val"] & groups["test"]
    for dataset in loaded.splits.values():
        assert dataset.class_counts()["rare"] == 3  # one whole patient each
    assert loaded.split["splits"]["test"]["size"] == 24  # 8 of the 40 patients


def test_fold_plan_gives_the_nearest_fraction_with_the_fewest_folds():
    from kdkit.image_data import _fold_plan

    assert _fold_plan(0.2, 20) == (5, 1)
    assert _fold_plan(0.1, 20) == (10, 1)
    assert _fold_plan(0.3, 20) == (10, 3)
    assert _fold_plan(0.15, 20) == (7, 1)
    assert _fold_plan(0.1, 4) == (4, 1)  # few groups: the nearest that they allow


def test_csv_without_groups_is_split_stratified_with_numeric_labels_in_order(tmp_path):
    rows = []
    for label, count in (("2", 6), ("10", 6), ("1", 6)):
        for index in range(count):
            rows.append([_image(tmp_path / "d" / "img" / f"{label}_{index}.png", int(label) * 10 + index).name, label])
    # Paths relative to the CSV's folder, here a subfolder; spaces around cells are ignored.
    csv_path = _write_csv(tmp_path / "d" / "img" / "list.csv", [" Path", "Label "], [[f" {p}", f"{l} "] for p, l in rows])
    loaded = _load(csv_path, tmp_path, test_fraction=1 / 3, val_fraction=None)
    assert loaded.classes == ["1", "2", "10"]
    assert loaded.splits["test"].class_counts() == {"1": 2, "2": 2, "10": 2}
    assert loaded.split["splits"]["test"]["method"] == "stratified (sklearn train_test_split)"


def test_real_mri_images_in_class_folders(tmp_path):
    source = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brain_tumor_mri" / "Training"
    if not source.is_dir():
        pytest.skip(f"{source} not found")
    classes = sorted(folder.name for folder in source.iterdir() if folder.is_dir())
    for name in classes:
        for file in sorted((source / name).iterdir())[:10]:
            (tmp_path / "mri" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(file, tmp_path / "mri" / name / file.name)
    loaded = _load(tmp_path / "mri", tmp_path)
    assert loaded.classes == classes
    assert {name: len(dataset) for name, dataset in loaded.splits.items()} == {"train": 28, "val": 4, "test": 8}
    assert all(set(dataset.class_counts().values()) <= {1, 2, 7} for dataset in loaded.splits.values())


def test_no_hugging_face_datasets_involved(tmp_path, monkeypatch):
    root = _class_folders(tmp_path / "pets", {name: 10 for name in CLASSES})
    monkeypatch.setitem(sys.modules, "datasets", None)  # any import of it fails
    _load(root, tmp_path)
    load_imagefolder(root, SIZE, cache_dir=tmp_path / "cache", progress=False)
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [
        path.name for path in (tmp_path / "cache").glob("pets-*.pt")
    ]


def test_unreadable_files_are_left_out_of_unchanged_splits(tmp_path):
    root = _class_folders(tmp_path / "pets", {name: 10 for name in CLASSES}, suffix=".jpg")
    before = _split_files(_load(root, tmp_path))
    broken = Path(before["test"][0])
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(CorruptImageError, match=str(broken)):
        _load(root, tmp_path)

    after = _load(root, tmp_path, on_corrupt="skip")
    assert _split_files(after) == {name: [p for p in paths if p != str(broken)] for name, paths in before.items()}
    assert after.split["skipped"] == [broken.relative_to(root.resolve()).as_posix()]


# --------------------------------------------------------------------------- bad data


def test_not_a_data_set_says_what_it_expected_and_found(tmp_path, no_decoding):
    loose = tmp_path / "loose"
    for index in range(3):
        _image(loose / f"{index}.png", index)
    (loose / "labels.csv").write_text("path,label\n")
    with pytest.raises(ImageDataError) as error:
        _load(loose, tmp_path)
    message = str(error.value)
    assert str(loose) in message and "3 image file(s)" in message and "labels.csv" in message
    assert "train/ and test/" in message and "one folder per class" in message and "pass its path" in message

    with pytest.raises(FileNotFoundError, match="missing"):
        _load(tmp_path / "missing", tmp_path)
    with pytest.raises(ImageDataError, match=r"not a \.csv file"):
        _load(loose / "0.png", tmp_path)


def test_a_data_set_one_folder_down_is_pointed_at(tmp_path, no_decoding):
    _class_folders(tmp_path / "download" / "pets" / "train", {name: 3 for name in CLASSES})
    with pytest.raises(ImageDataError, match=r"did you mean to pass .*download/pets\?"):
        _load(tmp_path / "download", tmp_path)


def test_split_names_without_a_training_folder(tmp_path, no_decoding):
    _class_folders(tmp_path / "d" / "Testing", {name: 3 for name in CLASSES})
    with pytest.raises(ImageDataError, match=r"has Testing/ but no training folder"):
        _load(tmp_path / "d", tmp_path)


@pytest.mark.parametrize("layout", ["class folders", "split folders"])
def test_empty_and_single_image_class_folders_are_named(tmp_path, no_decoding, layout):
    root = tmp_path / "pets"
    classes_dir = root if layout == "class folders" else root / "train"
    _class_folders(classes_dir, {"cat": 5, "dog": 1})
    (classes_dir / "owl").mkdir()
    (classes_dir / "owl" / "notes.txt").write_text("")
    if layout == "split folders":
        _class_folders(root / "test", {name: 2 for name in CLASSES})
    with pytest.raises(ImageDataError) as error:
        _load(root, tmp_path)
    message = str(error.value)
    assert f"class folder {classes_dir / 'owl'} holds no images (found other files notes.txt)" in message
    assert f"class folder {classes_dir / 'dog'} holds a single image (dog_00.png)" in message


def test_class_names_differing_only_in_case_are_named_both(tmp_path, no_decoding):
    root = tmp_path / "mri"
    _class_folders(root / "Training", {"glioma": 3, "pituitary": 3})
    _class_folders(root / "Testing", {"glioma": 2, "Pituitary": 2})
    with pytest.raises(ImageDataError, match=r"Training/pituitary and Testing/Pituitary differ only in case"):
        _load(root, tmp_path)
    flat = _class_folders(tmp_path / "flat", {"Cat": 3, "cat": 3, "dog": 3})
    with pytest.raises(ImageDataError, match=r"Class folders of .*flat: class folders Cat/ and cat/ differ only in case"):
        _load(flat, tmp_path)


def test_a_class_missing_from_one_split_is_named_with_the_split(tmp_path, no_decoding):
    root = tmp_path / "mri"
    _class_folders(root / "train", {"glioma": 3, "meningioma": 3, "notumor": 3})
    _class_folders(root / "test", {"glioma": 2, "notumor": 2})
    with pytest.raises(ImageDataError, match=r"class 'meningioma' has a folder in train/ but none in test/"):
        _load(root, tmp_path)


def test_a_single_class_is_refused(tmp_path, no_decoding):
    _class_folders(tmp_path / "one", {"cat": 4})
    with pytest.raises(ImageDataError, match=r"holds a single class 'cat'.*at least two"):
        _load(tmp_path / "one", tmp_path)
    rows = [[_image(tmp_path / "c" / f"{i}.png", i).name, "cat"] for i in range(4)]
    with pytest.raises(ImageDataError, match=r"single label 'cat'"):
        _load(_write_csv(tmp_path / "c" / "l.csv", ["path", "label"], rows), tmp_path)


def test_csv_rows_with_missing_files_are_all_listed_up_to_a_cap(tmp_path, no_decoding):
    rows = [[_image(tmp_path / "d" / f"{label}{i}.png", i).name, label] for label in "ab" for i in range(3)]
    rows += [[f"gone/{i}.png", "a"] for i in range(25)]
    with pytest.raises(ImageDataError) as error:
        _load(_write_csv(tmp_path / "d" / "l.csv", ["path", "label"], rows), tmp_path)
    message = str(error.value)
    assert "25 listed file(s) do not exist" in message
    assert "row 8: gone/0.png" in message and "row 27: gone/19.png" in message
    assert "gone/20.png" not in message and "... and 5 more" in message


def test_csv_without_path_and_label_columns_names_the_columns_found(tmp_path, no_decoding):
    csv_path = _write_csv(tmp_path / "l.csv", ["file", "diagnosis"], [["a.png", "x"]])
    with pytest.raises(ImageDataError, match=r"lacks the column\(s\) path, label: found columns \['file', 'diagnosis'\]"):
        _load(csv_path, tmp_path)
    semicolons = tmp_path / "semi.csv"
    semicolons.write_text("image;class\na.png;x\n")
    with pytest.raises(ImageDataError, match=r"found columns \['image', 'class'\]"):
        _load(semicolons, tmp_path)


def test_csv_label_seen_once_is_named_with_its_row_and_nearest_class(tmp_path, no_decoding):
    rows = [[_image(tmp_path / "d" / f"{label}{i}.png", i).name, label] for label in ("glioma", "notumor") for i in range(3)]
    rows.insert(2, [_image(tmp_path / "d" / "typo.png", 99).name, "glioam"])
    with pytest.raises(ImageDataError, match=r"label 'glioam' occurs only once \(row 4\).*did you mean 'glioma'\?"):
        _load(_write_csv(tmp_path / "d" / "l.csv", ["path", "label"], rows), tmp_path)


def test_csv_repeated_paths_empty_cells_and_case_variants(tmp_path, no_decoding):
    files = [_image(tmp_path / "d" / f"{i}.png", i).name for i in range(6)]
    rows = [[files[0], "a"], [files[1], "a"], [files[2], "b"], [files[0], "b"], [files[3], ""]]
    with pytest.raises(ImageDataError) as error:
        _load(_write_csv(tmp_path / "d" / "l.csv", ["path", "label"], rows), tmp_path)
    assert f"row 5: {files[0]} is listed again (first on row 2)" in str(error.value)
    assert "row 6: empty label" in str(error.value)

    (tmp_path / "d" / "scan.dcm").write_bytes(b"DICM")
    rows = [[files[0], "a"], [files[1], "a"], ["scan.dcm", "a"], [files[2], "b"], [files[3], "b"]]
    with pytest.raises(ImageDataError, match=r"row 4: scan.dcm is not an image file Pillow can read \(.dcm\)"):
        _load(_write_csv(tmp_path / "d" / "l.csv", ["path", "label"], rows), tmp_path)

    rows = [[files[0], "Benign"], [files[1], "Benign"], [files[2], "benign"], [files[3], "benign"], [files[4], "x"], [files[5], "x"]]
    with pytest.raises(ImageDataError, match=r"labels 'Benign' \(row 2\) and 'benign' \(row 4\) differ only in case"):
        _load(_write_csv(tmp_path / "d" / "l.csv", ["path", "label"], rows), tmp_path)


def test_csv_class_all_in_one_group_is_refused(tmp_path, no_decoding):
    rows = [[_image(tmp_path / "d" / f"a{i}.png", i).name, "a", f"p{i}"] for i in range(4)]
    rows += [[_image(tmp_path / "d" / f"b{i}.png", 10 + i).name, "b", "p9"] for i in range(3)]
    csv_path = _write_csv(tmp_path / "d" / "l.csv", ["path", "label", "group"], rows)
    with pytest.raises(ImageDataError, match=r"the 3 images of class 'b' belong to 1 group\(s\) \('p9'\); train and test need 2"):
        _load(csv_path, tmp_path, val_fraction=None)
    # With validation carved too, a class needs a third group.
    rows += [[_image(tmp_path / "d" / "b9.png", 19).name, "b", "p8"]]
    csv_path = _write_csv(tmp_path / "d" / "l.csv", ["path", "label", "group"], rows)
    with pytest.raises(ImageDataError, match=r"class 'b' belong to 2 group\(s\) \('p8', 'p9'\); train, test and val need 3.*val_fraction=None"):
        _load(csv_path, tmp_path)


def test_a_fraction_that_leaves_a_class_out_names_it(tmp_path, no_decoding):
    root = _class_folders(tmp_path / "pets", {"cat": 25, "dog": 25, "owl": 3})
    # 6 test images: 3 of the 5.3 shares go to cat and dog, none of owl's 0.34 is enough.
    with pytest.raises(ImageDataError, match=r"test_fraction=0.1 .*class 'owl' \(3 of the data set\) gets no test image.*at least 0.34"):
        _load(root, tmp_path, test_fraction=0.1)
    # 2 owls cannot fill train, test and val.
    pair = _class_folders(tmp_path / "pair", {"cat": 20, "dog": 20, "owl": 2})
    with pytest.raises(ImageDataError, match=r"class 'owl' has 2 images; train, test and val need at least 3.*val_fraction=None"):
        _load(pair, tmp_path)
    # Too few carved images for the classes: sklearn would refuse; the message names who misses out.
    small = _class_folders(tmp_path / "small", {name: 4 for name in CLASSES})
    with pytest.raises(ImageDataError, match=r"val_fraction=0.1 leaves 1 of the 9 images .* for val, fewer than the 3 classes"):
        _load(small, tmp_path, test_fraction=0.25)


def test_bad_arguments(tmp_path):
    root = _class_folders(tmp_path / "pets", {name: 4 for name in CLASSES})
    for kwargs, message in (
        ({"test_fraction": 0}, "test_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"on_corrupt": "ignore"}, "on_corrupt"),
    ):
        with pytest.raises(ValueError, match=message):
            _load(root, tmp_path, **kwargs)


def test_a_split_sklearn_refuses_is_still_named(tmp_path, no_decoding, monkeypatch):
    """No bare sklearn error, should a case the checks do not foresee reach it."""
    from kdkit import image_data

    def refuse(*args, **kwargs):
        raise ValueError("The test_size = 1 should be greater or equal to the number of classes = 3")

    monkeypatch.setattr(image_data, "train_test_split", refuse)
    root = _class_folders(tmp_path / "pets", {name: 10 for name in CLASSES})
    with pytest.raises(ImageDataError) as error:
        _load(root, tmp_path)
    message = str(error.value)
    assert "Cannot carve test images (test_fraction=0.2) from the data set: its 30 images" in message
    assert "'cat' 10, 'dog' 10, 'owl' 10" in message and "The test_size = 1" in message
    assert "change test_fraction or add images" in message

    class RefusingFolds:
        def __init__(self, **kwargs):
            pass

        def split(self, *args):
            raise ValueError("n_splits=5 cannot be greater than the number of members in each class.")

    monkeypatch.setattr(image_data, "StratifiedGroupKFold", RefusingFolds)
    with pytest.raises(ImageDataError, match=r"from the data set: its \d+ images in 18 groups .*n_splits=5"):
        _load(_patients_csv(tmp_path / "clinic"), tmp_path)
