"""Tests for kdkit.data: data location, image-folder loading and caching, reliability on bad
files, subsets, transforms and SMOTE; plus checks against the real data sets when present."""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from imblearn.over_sampling import SMOTE
from PIL import Image

from conftest import requires_real_data

from kdkit import data
from kdkit.data import (
    CorruptImageError,
    ImageTensorDataset,
    SplitError,
    balanced_subset_indices,
    eval_transforms,
    load_imagefolder,
    smote_balance,
    stratified_split_indices,
)
from kdkit.image_data import ImageDataError
from kdkit_zoo.hdkd import datasets as hdkd_datasets
from kdkit_zoo.hdkd.augmentations import hdkd_train_transforms
from kdkit_zoo.hdkd.datasets import dataset_dir, load_brain_tumor_mri, load_ham10000, resolve_data_root


def _noise(height: int = 24, width: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _make_folder(root: Path) -> Path:
    """train/ and test/ with cat/dog classes in various modes, plus files to be ignored."""
    _save(Image.fromarray(_noise(seed=1)), root / "train" / "cat" / "rgb.jpg")
    _save(Image.fromarray(_noise(seed=2)[..., 0], mode="L"), root / "train" / "cat" / "gray.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x01")
    _save(Image.fromarray(_noise(seed=3)).convert("RGBA"), root / "train" / "dog" / "rgba.png")
    palette = Image.fromarray(_noise(seed=4)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    _save(palette, root / "train" / "dog" / "palette.png")
    _save(Image.fromarray(_noise(seed=5)), root / "test" / "cat" / "a.jpg")
    _save(Image.fromarray(_noise(seed=6)), root / "test" / "dog" / "b.bmp")
    return root


def _truncated_jpeg(path: Path) -> Path:
    _save(Image.fromarray(_noise(64, 64, seed=7)), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


# --------------------------------------------------------------------------- locations


def test_resolve_data_root_prefers_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(hdkd_datasets.DATA_ROOT_ENV, str(tmp_path / "from_env"))
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_root() == tmp_path / "from_env"


def test_resolve_data_root_falls_back_to_cwd_then_repository(tmp_path, monkeypatch):
    monkeypatch.delenv(hdkd_datasets.DATA_ROOT_ENV, raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    assert resolve_data_root() == (tmp_path / "shared" / "data").resolve()

    elsewhere = tmp_path / "elsewhere" / "cwd"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(hdkd_datasets, "_REPO_ROOT", tmp_path / "project")
    assert resolve_data_root() == (tmp_path / "shared" / "data").resolve()

    monkeypatch.setattr(hdkd_datasets, "_REPO_ROOT", elsewhere)
    with pytest.raises(FileNotFoundError, match="No data root found") as error:
        resolve_data_root()
    assert str(elsewhere / ".." / "shared" / "data") in str(error.value)


@pytest.mark.parametrize(("name", "source"), [("brain_tumor_mri", "Nickparvar"), ("ham10000", "Tschandl")])
def test_dataset_dir_missing_says_where_it_looked_and_where_to_get_it(tmp_path, name, source):
    with pytest.raises(FileNotFoundError) as error:
        dataset_dir(name, tmp_path)
    assert str(tmp_path / name) in str(error.value)
    assert source in str(error.value)


# --------------------------------------------------------------------------- image folders


def test_load_imagefolder_converts_modes_and_ignores_non_images(tmp_path):
    root = _make_folder(tmp_path / "pets")
    splits = load_imagefolder(root, 16, cache_dir=tmp_path / "cache", progress=False)

    assert set(splits) == {"train", "test"}
    train, test = splits["train"], splits["test"]
    assert train.classes == test.classes == ["cat", "dog"]
    assert train.images.shape == (4, 3, 16, 16) and train.images.dtype == torch.uint8
    assert train.class_counts() == {"cat": 2, "dog": 2}
    assert test.labels.tolist() == [0, 1]
    assert [Path(path).name for path in train.paths] == ["gray.png", "rgb.jpg", "palette.png", "rgba.png"]
    gray = train.images[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert train.skipped == []


def test_load_imagefolder_reuses_cache_until_a_file_changes(tmp_path, monkeypatch):
    root = _make_folder(tmp_path / "pets")
    first = load_imagefolder(root, 16, cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(data, "_decode_images", no_decoding)
        second = load_imagefolder(root, 16, cache_dir=tmp_path / "cache", progress=False)
    for name in first:
        assert torch.equal(first[name].images, second[name].images)
        assert torch.equal(first[name].labels, second[name].labels)

    changed = root / "test" / "cat" / "a.jpg"
    _save(Image.fromarray(_noise(seed=9)), changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = load_imagefolder(root, 16, cache_dir=tmp_path / "cache", progress=False)
    assert not torch.equal(first["test"].images[0], third["test"].images[0])


def test_load_imagefolder_default_and_explicit_splits(tmp_path):
    flat = tmp_path / "flat"
    _save(Image.fromarray(_noise(seed=1)), flat / "a" / "1.png")
    _save(Image.fromarray(_noise(seed=2)), flat / "b" / "2.png")
    assert list(load_imagefolder(flat, 8, cache_dir=tmp_path / "cache", progress=False)) == ["train"]

    kaggle = tmp_path / "kaggle"
    for split in ("Training", "Validation", "Testing"):
        for name in ("no", "yes"):
            _save(Image.fromarray(_noise(seed=3)), kaggle / split / name / "x.png")
    found = load_imagefolder(kaggle, 8, cache_dir=tmp_path / "cache", progress=False)
    assert list(found) == ["train", "val", "test"]

    chosen = load_imagefolder(
        kaggle, 8, splits={"fit": "Training"}, cache_dir=tmp_path / "cache", progress=False
    )
    assert list(chosen) == ["fit"] and chosen["fit"].classes == ["no", "yes"]


def test_truncated_jpeg_raises_error_naming_the_file(tmp_path):
    root = _make_folder(tmp_path / "pets")
    broken = _truncated_jpeg(root / "train" / "dog" / "broken.jpg")
    with pytest.raises(CorruptImageError, match=str(broken)):
        load_imagefolder(root, 16, cache_dir=tmp_path / "cache", progress=False)


def test_truncated_jpeg_is_skipped_logged_and_counted(tmp_path, caplog):
    root = _make_folder(tmp_path / "pets")
    broken = _truncated_jpeg(root / "train" / "dog" / "broken.jpg")
    with caplog.at_level(logging.WARNING, logger="kdkit.data"):
        splits = load_imagefolder(root, 16, cache_dir=tmp_path / "cache", on_corrupt="skip", progress=False)
    assert splits["train"].skipped == [str(broken)]
    assert len(splits["train"]) == 4 and str(broken) not in splits["train"].paths
    assert str(broken) in caplog.text

    # The cache remembers the skipped file: a strict load still refuses it.
    with pytest.raises(CorruptImageError, match=str(broken)):
        load_imagefolder(root, 16, cache_dir=tmp_path / "cache", progress=False)


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = _make_folder(tmp_path / "pets")
    empty = root / "train" / "bird"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{empty} contains no images"):
        load_imagefolder(root, 16, cache_dir=tmp_path / "cache", progress=False)


def test_class_folders_that_differ_between_splits_are_refused_naming_them(tmp_path):
    """As load_image_data refuses them: merged, they gave classes empty on one side."""
    mri = tmp_path / "mri"
    for split, names in (("Training", ("glioma", "pituitary")), ("Testing", ("glioma", "Pituitary"))):
        for name in names:
            _save(Image.fromarray(_noise(seed=1)), mri / split / name / "1.png")
    with pytest.raises(ImageDataError, match=r"Training/pituitary and Testing/Pituitary differ only in case"):
        load_imagefolder(mri, 8, cache_dir=tmp_path / "cache", progress=False)

    root = _make_folder(tmp_path / "pets")
    _save(Image.fromarray(_noise(seed=8)), root / "test" / "owl" / "c.png")
    with pytest.raises(ValueError, match=r"class 'owl' has a folder in test/ but none in train/"):
        load_imagefolder(root, 8, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()  # refused before decoding


def test_a_single_class_is_refused(tmp_path):
    one = tmp_path / "one"
    for split in ("train", "test"):
        _save(Image.fromarray(_noise(seed=1)), one / split / "cat" / "1.png")
    with pytest.raises(ImageDataError, match=r"holds a single class 'cat'; classification needs at least two"):
        load_imagefolder(one, 8, cache_dir=tmp_path / "cache", progress=False)


def test_folder_without_images_is_an_error_naming_it(tmp_path):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=f"{tmp_path / 'nothing'} has no class subfolders"):
        load_imagefolder(tmp_path / "nothing", 16, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_imagefolder(tmp_path / "missing", 16, cache_dir=tmp_path / "cache", progress=False)


# --------------------------------------------------------------------------- dataset


def _tiny_dataset(count: int = 6) -> ImageTensorDataset:
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 2, 2).contiguous()
    return ImageTensorDataset(images, [index % 2 for index in range(count)], ["even", "odd"])


def test_dataset_items_are_float_and_transformed():
    dataset = _tiny_dataset()
    image, label = dataset[3]
    assert image.dtype == torch.float32 and label == 1
    assert torch.allclose(image, torch.full((3, 2, 2), 3 / 255))
    doubled = dataset.with_transform(lambda image: image.float() * 2)
    assert torch.equal(doubled[3][0], torch.full((3, 2, 2), 6.0))
    assert dataset.transform is None


def test_subset_shares_storage_and_composes():
    dataset = _tiny_dataset()
    subset = dataset.subset([5, 1, 3])
    assert subset.labels.tolist() == [1, 1, 1] and subset.class_counts() == {"even": 0, "odd": 3}
    nested = subset.subset(np.array([2]))
    assert nested[0][0][0, 0, 0] == pytest.approx(3 / 255)

    dataset.images[3] = 255  # visible through the subsets: no copy was made
    assert nested[0][0].min() == 1.0
    assert subset.images.shape == (3, 3, 2, 2)


def test_make_loader_drops_the_partial_training_batch_unless_it_is_the_only_one():
    dataset = _tiny_dataset(6)
    assert [len(labels) for _, labels in data.make_loader(dataset, 4, train=True)] == [4]
    assert [len(labels) for _, labels in data.make_loader(dataset, 8, train=True)] == [6]
    evaluation = [labels.tolist() for _, labels in data.make_loader(dataset, 4, train=False)]
    assert evaluation == [[0, 1, 0, 1], [0, 1]]  # every image, in order


def test_uint8_view_yields_the_stored_images_and_shares_storage():
    dataset = _tiny_dataset(6).with_transform(lambda image: image.float() * 2)
    raw = dataset.as_uint8()
    image, label = raw[3]
    assert image.dtype == torch.uint8 and torch.equal(image, torch.full((3, 2, 2), 3, dtype=torch.uint8))
    assert label == 1 and raw.transform is None and raw.yields_uint8 and not dataset.yields_uint8
    assert raw.subset([5, 3])[0][0].dtype == torch.uint8  # subsets stay uint8
    assert raw.with_transform(None)[3][0].dtype == torch.float32  # a transform view is float again

    dataset.images[3] = 200  # one storage: the view sees the change
    assert int(raw[3][0].max()) == 200
    images, _ = next(iter(data.make_loader(raw, 4, train=False, num_processes=1)))
    floats, _ = next(iter(data.make_loader(raw.with_transform(None), 4, train=False, num_processes=1)))
    assert images.dtype == torch.uint8 and floats.dtype == torch.float32
    assert 4 * images.nbytes == floats.nbytes


def test_make_loader_splits_the_global_batch_across_processes(monkeypatch):
    dataset = _tiny_dataset(20)
    assert data.make_loader(dataset, 8, train=True, num_processes=4).batch_size == 2
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch and torchrun set it
    loader = data.make_loader(dataset, 8, train=True)
    assert loader.batch_size == 4 and loader.drop_last
    # the partial batch is kept when the set is no larger than one global batch
    assert not data.make_loader(dataset, 20, train=True).drop_last
    with pytest.raises(ValueError, match="batch size 30 does not divide evenly across 8 processes"):
        data.make_loader(dataset, 30, train=True, num_processes=8)
    with pytest.raises(ValueError, match="must be positive"):
        data.per_process_batch_size(8, 0)
    assert data.per_process_batch_size(32, 8) == 4


def test_make_loader_pins_memory_when_cuda_is_there_unless_told():
    dataset = _tiny_dataset(4)
    assert data.make_loader(dataset, 2, train=False).pin_memory == torch.cuda.is_available()
    assert data.make_loader(dataset, 2, train=False, pin_memory=False).pin_memory is False
    # Training workers restart every epoch (reseeded: exact resume); evaluation ones may stay.
    training = data.make_loader(dataset, 2, train=True, workers=1, pin_memory=False)
    assert training.num_workers == 1 and not training.persistent_workers
    assert data.make_loader(dataset, 2, train=False, workers=1).persistent_workers


@pytest.mark.parametrize("num_processes", [1, 2, 8])
@pytest.mark.parametrize(
    ("num_items", "batch_size"), [(1, 8), (3, 8), (8, 8), (20, 8), (31, 8), (33, 32), (200, 32), (257, 32)]
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batches_per_process_is_what_accelerate_gives_each_process(num_processes, num_items, batch_size, train):
    from accelerate.data_loader import prepare_data_loader

    dataset = _tiny_dataset(num_items).as_uint8()
    loader = data.make_loader(dataset, batch_size, train=train, num_processes=num_processes, pin_memory=False)
    expected = data.batches_per_process(num_items, batch_size, train=train, num_processes=num_processes)
    images_seen = 0
    for index in range(num_processes):
        shard = prepare_data_loader(loader, num_processes=num_processes, process_index=index, put_on_device=False)
        batches = [len(labels) for _, labels in shard]
        assert len(batches) == len(shard) == expected >= 1
        images_seen += sum(batches)
    if train and num_items > batch_size:  # whole global batches only
        assert images_seen == num_items // batch_size * batch_size
    else:  # every image at least once (accelerate repeats some to even out the processes)
        assert images_seen >= num_items
    if (num_items, batch_size, num_processes, train) == (200, 32, 8, True):
        assert expected == 6  # 6 steps of 32 images, the 8 left over dropped


def test_dataset_rejects_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        ImageTensorDataset(torch.zeros(2, 3, 4, 4), [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        ImageTensorDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [0], ["a", "b"])
    with pytest.raises(ValueError, match="labels must lie"):
        ImageTensorDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [0, 2], ["a", "b"])


# --------------------------------------------------------------------------- subsets


def test_balanced_subsets_are_capped_nested_and_seeded():
    labels = np.array([0] * 30 + [1] * 8 + [2] * 50)
    small = balanced_subset_indices(labels, 5, seed=3)
    large = balanced_subset_indices(labels, 10, seed=3)
    assert np.bincount(labels[small]).tolist() == [5, 5, 5]
    assert np.bincount(labels[large]).tolist() == [10, 8, 10]
    assert set(small) <= set(large)
    assert np.array_equal(balanced_subset_indices(labels, None, seed=3), np.arange(len(labels)))
    assert np.array_equal(small, balanced_subset_indices(torch.as_tensor(labels), 5, seed=3))
    assert not np.array_equal(small, balanced_subset_indices(labels, 5, seed=4))


def test_stratified_split_is_disjoint_complete_and_stratified():
    labels = np.array([0] * 80 + [1] * 20)
    train, val = stratified_split_indices(labels, 0.25, seed=0)
    assert len(val) == 25 and np.bincount(labels[val]).tolist() == [20, 5]
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    with pytest.raises(ValueError):
        stratified_split_indices(labels, 1.0, seed=0)


def test_stratified_split_of_too_few_images_names_the_set_and_the_fix():
    """Not sklearn's bare "The test_size = 1 should be greater or equal to the number of classes"."""
    labels = np.array([0] * 4 + [1] * 4 + [2] * 4)
    with pytest.raises(SplitError, match=r"the data set \(12 images of 3 classes\) with val_fraction=0.1: that gives 2"):
        stratified_split_indices(labels, 0.1, seed=0)
    with pytest.raises(SplitError) as error:
        stratified_split_indices(labels, 0.1, seed=0, name="the images of Training/", classes=["a", "b", "c"])
    message = str(error.value)
    assert "the images of Training/ (12 images of 3 classes) with val_fraction=0.1" in message
    assert "gives 2 validation image(s), fewer than the 3 classes" in message
    assert "raise val_fraction to at least 0.25 or add images" in message
    assert len(stratified_split_indices(labels, 0.25, seed=0)[1]) == 3  # the advice works

    with pytest.raises(SplitError, match=r"leaves 1 training image\(s\), fewer than the 3 classes.*lower val_fraction"):
        stratified_split_indices(labels, 0.9, seed=0)
    with pytest.raises(SplitError, match=r"'b' has a single image.*add images of it or leave it out"):
        stratified_split_indices([0, 0, 0, 1, 2, 2], 0.5, seed=0, classes=["a", "b", "c"])
    with pytest.raises(SplitError, match=r"the data set \(3 images of 2 classes\).*class 1 has a single image"):
        stratified_split_indices([0, 0, 1], 0.5, seed=0)
    assert issubclass(SplitError, ValueError)


# --------------------------------------------------------------------------- transforms


def test_transforms_give_normalised_float_images():
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    augmented = hdkd_train_transforms(32)(image)
    assert augmented.shape == (3, 32, 32) and augmented.dtype == torch.float32
    assert eval_transforms(32)(image).shape == (3, 32, 32)

    square = image[:, :30, :30]
    normalised = eval_transforms(30, mean=(0.5,) * 3, std=(0.5,) * 3)(square)
    assert torch.allclose(normalised, square.float() / 127.5 - 1, atol=1e-6)


# --------------------------------------------------------------------------- SMOTE


def _smote_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Majority class of 6 images; minority class of exactly 2 parents with opposite pixels."""
    rng = np.random.default_rng(0)
    parent = torch.from_numpy(rng.integers(0, 256, (3, 4, 4), dtype=np.uint8))
    parents = torch.stack([parent, 255 - parent])
    majority = torch.from_numpy(rng.integers(0, 256, (6, 3, 4, 4), dtype=np.uint8))
    return torch.cat([majority, parents]), torch.tensor([0] * 6 + [1] * 2), parents


def test_smote_synthetic_pixels_lie_between_their_parents(caplog):
    images, labels, parents = _smote_example()
    with caplog.at_level(logging.WARNING, logger="kdkit.data"):
        balanced, balanced_labels = smote_balance(images, labels, seed=0)  # k_neighbors=5 -> 1
    assert "k_neighbors reduced from 5 to 1" in caplog.text

    assert balanced.dtype == torch.uint8 and torch.equal(balanced[: len(images)], images)
    assert torch.bincount(balanced_labels).tolist() == [6, 6]
    synthetic = balanced[len(images) :]
    assert len(synthetic) == 4 and (balanced_labels[len(images) :] == 1).all()
    low, high = torch.minimum(*parents), torch.maximum(*parents)
    assert ((synthetic >= low) & (synthetic <= high)).all()


def test_naive_uint8_smote_breaks_the_between_parents_property():
    images, labels, parents = _smote_example()
    flat = images.reshape(len(images), -1).numpy()  # uint8, as in the HDKD authors' code
    resampled, _ = SMOTE(k_neighbors=1, random_state=0).fit_resample(flat, labels.numpy())
    synthetic = torch.from_numpy(resampled[len(images) :]).reshape(-1, *images.shape[1:])
    low, high = torch.minimum(*parents), torch.maximum(*parents)
    assert not ((synthetic >= low) & (synthetic <= high)).all()


def test_smote_leaves_balanced_data_alone_and_rejects_singletons():
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    same, same_labels = smote_balance(images, torch.tensor([0, 0, 1, 1]))
    assert same is images and same_labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="at least 2 samples"):
        smote_balance(images, torch.tensor([0, 0, 0, 1]))


# --------------------------------------------------------------------------- real data

BRAIN_TUMOR_COUNTS = {
    "train": {"glioma": 1321, "meningioma": 1339, "notumor": 1591, "pituitary": 1457},
    "test": {"glioma": 300, "meningioma": 306, "notumor": 405, "pituitary": 300},
}


@requires_real_data("brain_tumor_mri")
def test_brain_tumor_mri_real_counts_and_cached_reload(tmp_path, monkeypatch):
    splits = load_brain_tumor_mri(image_size=16, cache_dir=tmp_path, progress=False)
    assert {name: split.class_counts() for name, split in splits.items()} == BRAIN_TUMOR_COUNTS
    assert len(splits["train"]) == 5708 and len(splits["test"]) == 1311
    assert splits["train"].images.shape == (5708, 3, 16, 16)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached reload must not decode images again")

    monkeypatch.setattr(data, "_read_rgb", no_decoding)
    again = load_brain_tumor_mri(image_size=16, cache_dir=tmp_path, progress=False)
    assert torch.equal(again["test"].images, splits["test"].images)


@requires_real_data("ham10000")
def test_ham10000_real_split_keeps_lesions_together(tmp_path):
    splits = load_ham10000(image_size=16, cache_dir=tmp_path, progress=False)
    train, test = splits["train"], splits["test"]
    assert train.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert len(train) + len(test) == 10015 and 700 <= len(test) <= 950
    assert min(train.class_counts().values()) > 0 and min(test.class_counts().values()) > 0

    with open(dataset_dir("ham10000") / "HAM10000_metadata.csv", newline="") as stream:
        lesion_of = {row["image_id"]: row["lesion_id"] for row in csv.DictReader(stream)}
    lesions = {name: {lesion_of[Path(path).stem] for path in split.paths} for name, split in splits.items()}
    assert not lesions["train"] & lesions["test"]

    same = load_ham10000(image_size=16, cache_dir=tmp_path, progress=False)
    other = load_ham10000(image_size=16, seed=1, cache_dir=tmp_path, progress=False)
    assert same["test"].paths == test.paths and other["test"].paths != test.paths
