"""Tests for kdkit.data's decoding of single files: images of more than 8 bits scaled by their
range, 8-bit images exactly as before, decompression bombs and NaN pixels as corrupt files; and
for the decoded-image cache: old caches of such images not served, stale temporary files of
killed writers removed while live writers' files are kept.

Images are written on the fly; 16-bit colour PNGs and TIFFs, which PIL cannot write, are
written byte by byte (PNG rows with the Sub filter, whose unfiltering depends on the bytes per
pixel, so that a decoder reading the wrong layout would show)."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from kdkit import checkpoint as kcheckpoint
from kdkit import data
from kdkit.data import CorruptImageError, load_imagefolder


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _png16(path: Path, samples: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG of ``samples`` (H x W x C), every row Sub-filtered."""
    height, width, channels = samples.shape
    per_pixel = 2 * channels
    rows = []
    for row in samples.astype(">u2").reshape(height, -1):
        raw = np.frombuffer(row.tobytes(), dtype=np.uint8)
        filtered = raw.copy()
        filtered[per_pixel:] = raw[per_pixel:] - raw[:-per_pixel]  # wraps modulo 256, as PNG's Sub
        rows.append(b"\x01" + filtered.tobytes())

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
    )
    return path


def _tiff16_rgb(path: Path, samples: np.ndarray, *, big_endian: bool) -> Path:
    """An uncompressed 16-bit RGB TIFF of ``samples`` (H x W x 3)."""
    order = ">" if big_endian else "<"
    height, width, _ = samples.shape
    pixels = samples.astype(f"{order}u2").tobytes()
    entries = [  # tag, type (3 short, 4 long), count, value
        (256, 3, 1, width), (257, 3, 1, height), (258, 3, 3, "bits"), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, "pixels"), (277, 3, 1, 3), (278, 3, 1, height), (279, 4, 1, len(pixels)), (284, 3, 1, 1),
    ]  # fmt: skip
    bits_at = 8 + 2 + 12 * len(entries) + 4
    offsets = {"bits": bits_at, "pixels": bits_at + 6}
    body = (b"MM" if big_endian else b"II") + struct.pack(f"{order}HIH", 42, 8, len(entries))
    for tag, kind, count, value in entries:
        value = offsets.get(value, value)
        if kind == 3 and count == 1:
            body += struct.pack(f"{order}HHIHH", tag, kind, count, value, 0)
        else:
            body += struct.pack(f"{order}HHII", tag, kind, count, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body + struct.pack(f"{order}I", 0) + struct.pack(f"{order}3H", 16, 16, 16) + pixels)
    return path


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The documented rule's result: [low, high] -> 0..255, rounded."""
    return np.clip(np.rint((values.astype(np.float64) - low) * (255 / (high - low))), 0, 255).astype(np.uint8)


def _ramp(low: float, high: float, dtype, size: int = 16) -> np.ndarray:
    return np.linspace(low, high, size * size).reshape(size, size).astype(dtype)


def _gray(pixels: np.ndarray) -> np.ndarray:
    """The three equal channels of a decoded gray image, as one ``H x W`` array."""
    assert pixels.shape[2] == 3 and (pixels == pixels[..., :1]).all()
    return pixels[..., 0]


def _two_classes(root: Path, special: Path | None = None) -> Path:
    """train/a and train/b with small 8-bit images; ``special`` is placed by the caller."""
    for name, seed in (("a", 1), ("b", 2)):
        pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        _save(Image.fromarray(pixels), root / "train" / name / f"{name}.png")
    return root


# --------------------------------------------------------------------------- high bit depth


def test_16_bit_grayscale_png_keeps_black_and_scales_its_maximum_to_white(tmp_path):
    """MRI slices exported as 16-bit PNGs of 12-bit values: not clipped to 255 as before."""
    ramp = _ramp(0, 4095, np.uint16)
    root = _two_classes(tmp_path / "mri")
    source = _save(Image.fromarray(ramp), root / "train" / "a" / "slice.png")
    assert Image.open(source).mode == "I;16"
    train = load_imagefolder(root, 16, cache_dir=tmp_path / "cache", progress=False)["train"]
    decoded = train.images[train.paths.index(str(source.resolve()))].permute(1, 2, 0).numpy()
    assert np.array_equal(_gray(decoded), _scaled(ramp, 0, 4095))
    assert (decoded == 255).mean() < 0.01

    # An image that starts above 0 keeps 0 as black: only its maximum is stretched to white.
    bright = _ramp(1000, 3000, np.uint16)
    pixels = data._read_rgb(_save(Image.fromarray(bright), tmp_path / "bright.png"), 16)
    assert np.array_equal(_gray(pixels), _scaled(bright, 0, 3000)) and _gray(pixels).min() == 85


def test_signed_integer_tiff_runs_from_its_minimum(tmp_path):
    """CT slices in Hounsfield units (-1000 for air)."""
    hounsfield = _ramp(-1000, 3000, np.int32)
    path = _save(Image.fromarray(hounsfield), tmp_path / "ct.tif")
    assert Image.open(path).mode == "I"
    assert np.array_equal(_gray(data._read_rgb(path, 16)), _scaled(hounsfield, -1000, 3000))


@pytest.mark.parametrize(
    ("low", "high", "scale_from"),
    [(0.0, 1.0, (0, 1)), (0.2, 0.7, (0, 1)), (-0.5, 0.5, (-0.5, 0.5)), (-2.0, 6.0, (-2, 6)), (10.0, 500.0, (10, 500))],
)
def test_float_tiff_in_unit_range_times_255_else_by_its_range(tmp_path, low, high, scale_from):
    values = _ramp(low, high, np.float32)
    path = _save(Image.fromarray(values), tmp_path / "float.tif")
    assert Image.open(path).mode == "F"
    assert np.array_equal(_gray(data._read_rgb(path, 16)), _scaled(values, *scale_from))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.zeros((4, 4), np.uint16), 0),
        (np.full((4, 4), 4095, np.uint16), 255),  # [0, 4095]: its maximum is white
        (np.full((4, 4), -1000, np.int32), 0),  # an empty range
        (np.full((4, 4), 0.5, np.float32), 128),
        (np.full((4, 4), 7.5, np.float32), 0),  # an empty range
    ],
    ids=["zeros", "constant-16-bit", "constant-negative", "constant-float-in-unit-range", "constant-float"],
)
def test_constant_images(tmp_path, values, expected):
    path = _save(Image.fromarray(values), tmp_path / "constant.tif")
    assert (data._read_rgb(path, 4) == expected).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_pixels_make_the_file_corrupt(tmp_path, bad):
    values = _ramp(0, 1, np.float32)
    values[3, 5] = bad
    root = _two_classes(tmp_path / "scans")
    broken = _save(Image.fromarray(values), root / "train" / "b" / "broken.tif").resolve()
    with pytest.raises(CorruptImageError, match=rf"{broken}: 1 of its 256 pixel values are NaN or infinite"):
        load_imagefolder(root, 8, cache_dir=tmp_path / "cache", progress=False)
    train = load_imagefolder(root, 8, cache_dir=tmp_path / "cache", on_corrupt="skip", progress=False)["train"]
    assert train.skipped == [str(broken)] and len(train) == 2


def _samples(channels: int, seed: int = 0) -> np.ndarray:
    # 12-bit values, as in 16-bit files of most scanners: PIL's high bytes alone would be 0..15.
    return np.random.default_rng(seed).integers(0, 4096, (6, 6, channels)).astype(np.uint16)


@pytest.mark.parametrize(
    "layout", ["RGB PNG", "RGBA PNG", "gray+alpha PNG", "RGB TIFF little-endian", "RGB TIFF big-endian"]
)
def test_16_bit_colour_and_gray_alpha_files_are_read_at_full_depth(tmp_path, layout):
    if layout == "RGB PNG":
        samples = _samples(3)
        path, colour = _png16(tmp_path / "x.png", samples, color_type=2), samples
    elif layout == "RGBA PNG":
        samples = _samples(4)
        path, colour = _png16(tmp_path / "x.png", samples, color_type=6), samples[..., :3]  # alpha dropped
    elif layout == "gray+alpha PNG":
        samples = _samples(2)
        path, colour = _png16(tmp_path / "x.png", samples, color_type=4), samples[..., :1].repeat(3, axis=2)
    else:
        samples = _samples(3)
        path, colour = _tiff16_rgb(tmp_path / "x.tif", samples, big_endian="big" in layout), samples
    decoded = data._read_rgb(path, 6)
    # One range over the red, green and blue samples: [0, their maximum].
    assert np.array_equal(decoded, _scaled(colour, 0, colour.max()))


def test_exif_orientation_turns_16_bit_images_as_8_bit_ones(tmp_path):
    ramp = _ramp(0, 4000, np.uint16, size=8)[:, :6]  # 8 x 6: a turn shows
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    wide = _save(Image.fromarray(ramp), tmp_path / "wide.png", exif=exif)
    narrow = _save(Image.fromarray(_scaled(ramp, 0, ramp.max())), tmp_path / "narrow.png", exif=exif)
    assert Image.open(wide).mode == "I;16" and Image.open(narrow).mode == "L"
    assert np.array_equal(data._read_rgb(wide, 5), data._read_rgb(narrow, 5))


def _read_rgb_before(path: Path, image_size: int) -> np.ndarray:
    """kdkit.data._read_rgb as it was before images of more than 8 bits were scaled."""
    with Image.open(path) as image:
        image.draft("RGB", (image_size, image_size))
        image = ImageOps.exif_transpose(image)
        if image.mode == "P":
            image = image.convert("RGBA")
        image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.array(image)


def test_8_bit_images_decode_byte_for_byte_as_before(tmp_path):
    """Caches and recorded results of 8-bit data sets stay valid."""
    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    files = [
        _save(Image.fromarray(rgb), tmp_path / "rgb.png"),
        _save(Image.fromarray(rgb), tmp_path / "rgb.jpg", quality=90),
        _save(Image.fromarray(np.tile(rgb, (4, 4, 1))), tmp_path / "large.jpg"),  # JPEG draft mode
        _save(Image.fromarray(rgb), tmp_path / "turned.jpg", exif=exif),
        _save(Image.fromarray(rgb[..., 0]), tmp_path / "gray.png"),
        _save(Image.fromarray(rgb).convert("LA"), tmp_path / "la.png"),
        _save(Image.fromarray(rgb).convert("RGBA"), tmp_path / "rgba.png"),
        _save(Image.fromarray(rgb).convert("1"), tmp_path / "bits.png"),
        _save(Image.fromarray(rgb).convert("CMYK"), tmp_path / "cmyk.jpg"),
        _save(Image.fromarray(rgb), tmp_path / "rgb.tif"),
        _save(palette, tmp_path / "palette.png"),
        _save(Image.fromarray(rgb), tmp_path / "rgb.bmp"),
    ]
    for path in files:
        for size in (16, 32):
            assert np.array_equal(data._read_rgb(path, size), _read_rgb_before(path, size)), path.name


# --------------------------------------------------------------------------- decompression bombs


def test_decompression_bomb_is_a_corrupt_file_named_with_its_size(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses over 200 pixels; 8 x 8 images pass
    root = _two_classes(tmp_path / "data")
    bomb = _save(Image.new("RGB", (20, 20)), root / "train" / "a" / "bomb.png").resolve()
    with pytest.raises(CorruptImageError) as error:
        load_imagefolder(root, 8, cache_dir=tmp_path / "cache", progress=False)
    message = str(error.value)
    assert str(bomb) in message and "400 pixels" in message and "200 pixels" in message
    assert "MAX_IMAGE_PIXELS" in message

    train = load_imagefolder(root, 8, cache_dir=tmp_path / "cache", on_corrupt="skip", progress=False)["train"]
    assert train.skipped == [str(bomb)] and len(train) == 2


def test_image_over_the_bomb_warning_limit_is_decoded_with_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    large = _save(Image.new("RGB", (12, 12), (10, 20, 30)), tmp_path / "large.png")
    with caplog.at_level(logging.WARNING, logger="kdkit.data"):
        pixels = data._read_rgb(large, 4)
    assert (pixels == (10, 20, 30)).all()
    assert str(large) in caplog.text and "144 pixels" in caplog.text


# --------------------------------------------------------------------------- cache


def _cache_path_before(cache_dir: Path, name: str, files: list[tuple[str, Path]], image_size: int) -> Path:
    """Where a cache of these files was written before high-bit-depth decoding (key version 1)."""
    digest = hashlib.sha256(f"v1 size={image_size}\n".encode())
    for group, path in files:
        stat = path.stat()
        digest.update(f"{group}\t{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return cache_dir / f"{name}-{image_size}px-{digest.hexdigest()[:20]}.pt"


def _listed(root: Path) -> list[tuple[str, Path]]:
    return [("train", path.resolve()) for path in sorted((root / "train").glob("*/*.png"))]


def test_cache_from_before_is_not_served_for_a_data_set_with_16_bit_images(tmp_path):
    root = _two_classes(tmp_path / "mri")
    ramp = _ramp(0, 4095, np.uint16, size=8)
    _save(Image.fromarray(ramp), root / "train" / "a" / "slice.png")
    files = _listed(root)
    # What the old decoder cached: the 16-bit image clipped to 255 (here simply all white).
    stale = _cache_path_before(tmp_path / "cache", "mri", files, 8)
    stale.parent.mkdir()
    wrong = {"images": torch.full((3, 3, 8, 8), 255, dtype=torch.uint8), "labels": torch.tensor([0, 0, 1]),
             "paths": [str(path) for _, path in files], "skipped": []}  # fmt: skip
    torch.save({"classes": ["a", "b"], "splits": {"train": wrong}}, stale)

    train = load_imagefolder(root, 8, cache_dir=tmp_path / "cache", progress=False)["train"]
    decoded = train.images[train.paths.index(str((root / "train" / "a" / "slice.png").resolve()))]
    assert torch.equal(decoded[0], torch.from_numpy(_scaled(ramp, 0, 4095)))
    assert not stale.exists() and len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_cache_from_before_is_reused_for_a_data_set_of_8_bit_images(tmp_path, monkeypatch):
    root = _two_classes(tmp_path / "pets")
    first = load_imagefolder(root, 8, cache_dir=tmp_path / "cache", progress=False)["train"]
    (written,) = (tmp_path / "cache").glob("*.pt")
    before = _cache_path_before(tmp_path / "cache", "pets", _listed(root), 8)
    written.rename(before)  # as a cache of the old version would lie there

    monkeypatch.setattr(data, "_decode_images", lambda *args, **kwargs: pytest.fail("decoded again"))
    again = load_imagefolder(root, 8, cache_dir=tmp_path / "cache", progress=False)["train"]
    assert torch.equal(again.images, first.images)
    assert list((tmp_path / "cache").glob("*.pt")) == [written]  # renamed to the new key, once


def test_an_unwritable_cache_is_a_warning_not_a_failure(tmp_path, caplog):
    root = _two_classes(tmp_path / "pets")
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="kdkit.data"):
        train = load_imagefolder(root, 8, cache_dir=blocked / "inner", progress=False)["train"]
    assert len(train) == 2 and "Could not write the decoded-image cache" in caplog.text


# --------------------------------------------------------------------------- stale temporaries


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_cache_is_written_through_a_temporary_naming_its_writer(tmp_path, monkeypatch):
    names = []
    save = torch.save

    def recording_save(payload, target):
        names.append(Path(target).name)
        save(payload, target)

    monkeypatch.setattr(torch, "save", recording_save)
    load_imagefolder(_two_classes(tmp_path / "pets"), 8, cache_dir=tmp_path / "cache", progress=False)
    (name,) = names
    owner = kcheckpoint._OWNED_TEMPORARY.match(name)
    assert owner and int(owner["pid"]) == os.getpid() and owner["host"] == kcheckpoint._host_tag()
    assert [path.suffix for path in (tmp_path / "cache").iterdir()] == [".pt"]  # no temporary left


@pytest.mark.skipif(os.name == "nt", reason="process ids are not checked on Windows")
def test_stale_cache_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    host, day = kcheckpoint._host_tag(), 24 * 60 * 60
    target = cache / "pets-8px-0123456789abcdef0123.pt"
    dead = cache / f".{target.name}.{host}.{_dead_pid()}.0123456789ab.tmp"
    live = cache / f".{target.name}.{host}.{os.getpid()}.0123456789ab.tmp"
    elsewhere = cache / f".{target.name}.another-host.1.0123456789ab.tmp"  # its writer cannot be checked
    old_unknown = cache / f".{target.name}.abcdef012345.tmp"  # atomic_write's name, from older versions
    young_unknown = cache / f".{target.name}.543210fedcba.tmp"
    other_file = cache / ".notes.tmp"  # not a cache's temporary
    for path in (dead, live, elsewhere, old_unknown, young_unknown, other_file):
        path.write_bytes(b"partial")
    long_ago = time.time() - 2 * day
    os.utime(old_unknown, (long_ago, long_ago))
    os.utime(other_file, (long_ago, long_ago))
    os.utime(live, (long_ago, long_ago))  # a live writer's file is kept whatever its age

    load_imagefolder(_two_classes(tmp_path / "pets"), 8, cache_dir=cache, progress=False)
    assert not dead.exists() and not old_unknown.exists()
    assert live.exists() and elsewhere.exists() and young_unknown.exists() and other_file.exists()

    os.utime(elsewhere, (long_ago, long_ago))
    assert set(kcheckpoint.clean_stale_temporaries(cache, ".*.tmp", max_age=day)) == {elsewhere, other_file}
    assert kcheckpoint.clean_stale_temporaries(cache, max_age=0) == [young_unknown]
    assert live.exists()
