"""Tests of the data layer: decoding, folder datasets, built-ins, DataLoader use."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from difforge.data import (
    BUILTIN_DATASETS,
    ImageDataset,
    UnreadableImageError,
    builtin_available,
    decode_image,
    list_image_files,
    load_builtin,
    load_dataset,
)
from difforge.data import builtin as builtin_module
from difforge.errors import DifforgeError

RNG = np.random.default_rng(0)


def noise(height: int, width: int, channels: int = 3) -> np.ndarray:
    """Random uint8 (H, W, C) pixels."""
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


def save(path: Path, img: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def jpeg_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def rgba_half_transparent(size: int = 16) -> Image.Image:
    """Red RGBA square whose left half is fully transparent."""
    arr = np.zeros((size, size, 4), dtype=np.uint8)
    arr[..., 0] = 255
    arr[:, size // 2 :, 3] = 255
    return Image.fromarray(arr, "RGBA")


def palette_gif_with_transparency(path: Path) -> Path:
    """Two-frame palette GIF; frame 0 is blue with a transparent top half."""
    frame = Image.new("P", (16, 16), 1)
    frame.putpalette([0, 0, 0, 0, 0, 255, 255, 0, 0] + [0] * (256 * 3 - 9))
    frame.paste(0, (0, 0, 16, 8))
    second = Image.new("P", (16, 16), 2)
    second.putpalette(frame.getpalette())
    return save(path, frame, save_all=True, append_images=[second], transparency=0)


def sixteen_bit_png(path: Path) -> Path:
    values = np.array([[0, 257 * 100, 65535, 32768]], dtype=np.uint16).repeat(4, axis=0)
    return save(path, Image.fromarray(values))


MIXED_GOOD = 9  # readable files in `mixed_folder`
MIXED_BAD = {"bad/empty.png", "bad/text.png", "truncated.jpg"}


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    """Readable images of every kind and three unreadable files, some nested."""
    root = tmp_path / "mixed"
    save(root / "photo.jpg", Image.fromarray(noise(40, 60)), quality=90)
    save(root / "cmyk.jpg", Image.fromarray(noise(30, 30)).convert("CMYK"))
    sixteen_bit_png(root / "sixteen.png")
    save(root / "rgba.png", rgba_half_transparent())
    palette_gif_with_transparency(root / "a" / "palette.gif")
    save(root / "a" / "grey.bmp", Image.fromarray(noise(20, 24, 1)[..., 0]))
    save(root / "a" / "b" / "c" / "deep.webp", Image.fromarray(noise(32, 32)))
    save(root / "a" / "b" / "wide.TIFF", Image.fromarray(noise(10, 50)))
    save(root / "la.png", Image.fromarray(noise(12, 12, 2), "LA"))
    (root / "bad").mkdir()
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "bad" / "text.png").write_text("this is not an image\n")
    full = jpeg_bytes(Image.fromarray(noise(64, 64)))
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


# ---------------------------------------------------------------- decoding single files
def test_decode_rgba_is_composited_over_white(tmp_path: Path) -> None:
    arr = decode_image(save(tmp_path / "x.png", rgba_half_transparent()), "RGB")
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    assert (arr[:, :8] == 255).all()  # transparent -> white
    assert (arr[:, 8:] == [255, 0, 0]).all()  # opaque red stays red
    grey = decode_image(tmp_path / "x.png", "L")
    assert grey.shape == (16, 16, 1)
    assert (grey[:, :8] == 255).all()


def test_decode_sixteen_bit_is_scaled(tmp_path: Path) -> None:
    arr = decode_image(sixteen_bit_png(tmp_path / "x.png"), "L")
    assert arr[0, :, 0].tolist() == [0, 100, 255, 128]
    assert decode_image(tmp_path / "x.png", "RGB")[0, 1].tolist() == [100, 100, 100]


def test_decode_palette_gif_first_frame_with_transparency(tmp_path: Path) -> None:
    arr = decode_image(palette_gif_with_transparency(tmp_path / "x.gif"), "RGB")
    assert (arr[:8] == 255).all()  # transparent index -> white
    assert (arr[8:] == [0, 0, 255]).all()  # first frame (blue), not the second (red)


def test_decode_cmyk_and_grey_bmp(tmp_path: Path) -> None:
    rgb = np.full((8, 8, 3), (200, 40, 90), dtype=np.uint8)
    cmyk = decode_image(save(tmp_path / "c.jpg", Image.fromarray(rgb).convert("CMYK")), "RGB")
    assert np.abs(cmyk.astype(int) - rgb).max() <= 8
    grey = noise(6, 5, 1)[..., 0]
    arr = decode_image(save(tmp_path / "g.bmp", Image.fromarray(grey)), "RGB")
    assert arr.shape == (6, 5, 3) and (arr == grey[..., None]).all()


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"hello", "not a recognised image format")],
)
def test_decode_bad_files_raise_with_name_and_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UnreadableImageError, match=reason) as info:
        decode_image(path, "RGB")
    assert "bad.png" in str(info.value) and isinstance(info.value, DifforgeError)


def test_decode_truncated_jpeg_is_detected(tmp_path: Path) -> None:
    full = jpeg_bytes(Image.fromarray(noise(64, 64)))
    for cut in (len(full) // 2, len(full) - 2):
        path = tmp_path / f"t{cut}.jpg"
        path.write_bytes(full[:cut])
        with pytest.raises(UnreadableImageError, match="truncated"):
            decode_image(path, "RGB")


def test_list_image_files_is_recursive_sorted_and_filtered(mixed_folder: Path) -> None:
    rel = [p.relative_to(mixed_folder).as_posix() for p in list_image_files(mixed_folder)]
    assert rel == sorted(rel)
    assert "a/b/c/deep.webp" in rel and "a/b/wide.TIFF" in rel
    assert "notes.txt" not in rel and len(rel) == MIXED_GOOD + len(MIXED_BAD)


# ---------------------------------------------------------------- folder datasets
def test_mixed_folder_skips_bad_files_and_uses_the_rest(
    mixed_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="difforge.data"):
        ds = load_dataset(mixed_folder, image_size=16)
    assert {name for name, _ in ds.skipped} == MIXED_BAD
    assert len(ds) == MIXED_GOOD and ds.channels == 3 and ds.num_classes == 0
    assert "3 unreadable files skipped" in ds.summary()
    assert sum("skipped 3 of 12" in r.getMessage() for r in caplog.records) == 1
    for i in range(len(ds)):
        image, cond = ds[i]
        label = cond["class_labels"]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert label.dtype == torch.int64 and label.shape == () and label.item() == -1


def test_folder_without_cache_gives_the_same_tensors(mixed_folder: Path) -> None:
    cached = load_dataset(mixed_folder, image_size=12, cache=True)
    lazy = load_dataset(mixed_folder, image_size=12, cache=False)
    assert cached.cached and not lazy.cached and len(cached) == len(lazy)
    for i in range(len(cached)):
        assert torch.equal(cached[i][0], lazy[i][0])


def test_file_failing_mid_run_is_replaced_not_raised(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path / f"{i}.png", Image.new("RGB", (8, 8), (i * 100, 0, 0)))
    ds = load_dataset(tmp_path, image_size=8, cache=False)
    (tmp_path / "1.png").write_bytes(b"broken")
    image, _ = ds[1]
    assert ds.runtime_failures == 1
    assert torch.equal(image, ds[2][0])  # deterministic substitute: the next readable one


def test_grey_folder_defaults_to_one_channel(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path / f"{i}.png", Image.fromarray(noise(10, 14, 1)[..., 0]))
    assert load_dataset(tmp_path, image_size=8).channels == 1
    assert load_dataset(tmp_path, image_size=8, channels=3)[0][0].shape == (3, 8, 8)
    save(tmp_path / "colour.jpg", Image.fromarray(noise(10, 10)))
    assert load_dataset(tmp_path, image_size=8).channels == 3
    assert load_dataset(tmp_path, image_size=8, channels=1)[3][0].shape == (1, 8, 8)


def test_resize_shorter_side_then_centre_crop(tmp_path: Path) -> None:
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, 20:40] = (255, 0, 0)  # red middle third, black sides
    save(tmp_path / "wide.png", Image.fromarray(arr))
    image, _ = load_dataset(tmp_path, image_size=10)[0]
    assert image.shape == (3, 10, 10)
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 10, 8)
    assert torch.equal(image[:, :, 1:-1], red)  # the crop is the middle third (the filter
    assert image[0].min() > 0.5  # lets a little black bleed into the outer columns)


def test_random_crop_and_flip_follow_torch_seed(tmp_path: Path) -> None:
    save(tmp_path / "wide.png", Image.fromarray(noise(8, 40)))
    ds = load_dataset(tmp_path, image_size=8, random_crop=True, hflip=True)
    torch.manual_seed(1)
    first = [ds[0][0] for _ in range(6)]
    torch.manual_seed(1)
    second = [ds[0][0] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(a.shape == (3, 8, 8) for a in first)
    assert len({a.sum().item() for a in first}) > 1  # crops/flips really vary


def test_class_folders_give_sorted_names_and_labels(tmp_path: Path) -> None:
    for name, count in (("zebra", 2), ("cat", 3), ("dog", 1)):
        for i in range(count):
            save(tmp_path / name / "sub" / f"{i}.png", Image.fromarray(noise(9, 9)))
    ds = load_dataset(tmp_path, image_size=8, class_folders=True)
    assert ds.class_names == ["cat", "dog", "zebra"] and ds.num_classes == 3
    assert sorted(ds[i][1]["class_labels"].item() for i in range(len(ds))) == [0, 0, 0, 1, 2, 2]
    assert load_dataset(tmp_path, image_size=8).num_classes == 0
    save(tmp_path / "loose.png", Image.fromarray(noise(9, 9)))
    with pytest.raises(DifforgeError, match="directly in"):
        load_dataset(tmp_path, image_size=8, class_folders=True)


def one_line_error(source: str | Path, match: str, **kwargs: object) -> None:
    with pytest.raises(DifforgeError, match=match) as info:
        load_dataset(source, **{"image_size": 8, **kwargs})  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    one_line_error(tmp_path / "empty", "no image files")
    one_line_error(tmp_path / "missing", "does not exist")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    (tmp_path / "bad" / "b.jpg").write_text("nope")
    one_line_error(tmp_path / "bad", "none of the 2 image files")
    (tmp_path / "file.png").write_bytes(b"")
    one_line_error(tmp_path / "file.png", "not a folder")
    one_line_error("no_such_dataset", "neither an existing folder nor a built-in.*mnist")
    one_line_error("mnist", "image size", image_size=0)
    one_line_error("mnist", "channels", channels=2)
    with pytest.raises(DifforgeError, match="valid names: mnist, digits, emoji"):
        load_builtin("cifar")


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin_module, "_package_dir", lambda module: None)
    load_builtin.cache_clear()
    try:
        with pytest.raises(DifforgeError, match=r'pip install "difforge\[datasets\]"'):
            load_dataset("digits", image_size=8)
        assert not builtin_available("digits")
    finally:
        load_builtin.cache_clear()


def test_fingerprint_is_stable_and_tracks_files_and_settings(tmp_path: Path) -> None:
    path = save(tmp_path / "a.png", Image.fromarray(noise(8, 8)))
    save(tmp_path / "b.png", Image.fromarray(noise(8, 8)))
    first = load_dataset(tmp_path, image_size=8).fingerprint
    assert load_dataset(tmp_path, image_size=8).fingerprint == first
    assert load_dataset(tmp_path, image_size=4).fingerprint != first
    assert load_dataset(tmp_path, image_size=8, hflip=True).fingerprint != first
    stat = path.stat()
    save(path, Image.fromarray(noise(8, 8)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_dataset(tmp_path, image_size=8).fingerprint != first


# ---------------------------------------------------------------- loaders and workers
def test_dataloader_with_two_workers_and_pickling(mixed_folder: Path) -> None:
    for cache in (True, False):
        ds = load_dataset(mixed_folder, image_size=8, cache=cache)
        clone = pickle.loads(pickle.dumps(ds))
        assert isinstance(clone, ImageDataset) and torch.equal(clone[0][0], ds[0][0])
        serial = torch.cat([x for x, _ in DataLoader(ds, batch_size=4)])
        loader = DataLoader(ds, batch_size=4, num_workers=2)
        parallel = torch.cat([x for x, _ in loader])
        assert parallel.shape == (len(ds), 3, 8, 8) and torch.equal(serial, parallel)


def test_distributed_sampler_splits_the_dataset(tmp_path: Path) -> None:
    for i in range(5):
        save(tmp_path / f"{i}.png", Image.fromarray(noise(8, 8)))
    ds = load_dataset(tmp_path, image_size=8)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        seen += [y["class_labels"].shape[0] for _, y in DataLoader(ds, batch_size=2, sampler=sampler)]
    assert sum(seen) == 6  # 5 padded to 2 x 3


# ---------------------------------------------------------------- built-ins
def needs(name: str) -> None:
    if not builtin_available(name):
        pytest.skip(f'built-in {name!r} needs its package: pip install "difforge[datasets]"')


def test_builtin_names() -> None:
    assert BUILTIN_DATASETS == ("mnist", "digits", "emoji")


def test_mnist() -> None:
    needs("mnist")
    ds = load_dataset("mnist", image_size=32)
    assert len(ds) == 5000 and ds.channels == 1 and ds.class_names == list("0123456789")
    labels = ds.labels
    assert labels.min() == 0 and labels.max() == 9 and np.bincount(labels).min() > 0
    image, cond = ds[4999]
    label = cond["class_labels"]
    assert image.shape == (1, 32, 32) and label.item() == labels[4999]
    assert (image[:, :2] == -1).all() and (image[:, :, -2:] == -1).all()  # the padding
    assert image.max() == 1.0  # ink reaches white
    assert "MNIST" in ds.attribution and ds.kind == "builtin"
    assert load_dataset("mnist", image_size=16, channels=3)[0][0].shape == (3, 16, 16)


def test_digits() -> None:
    needs("digits")
    data = load_builtin("digits")
    assert data.images.shape == (1797, 8, 8, 1) and data.images.max() == 255
    ds = load_dataset("digits", image_size=8)
    assert len(ds) == 1797 and ds.num_classes == 10 and set(ds.labels.tolist()) == set(range(10))
    assert ds.fingerprint == load_dataset("digits", image_size=8).fingerprint


def test_emoji() -> None:
    needs("emoji")
    data = load_builtin("emoji")
    assert data.images.shape == (4009, 72, 72, 3) and data.class_names == ()
    corners = data.images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255).all(axis=(1, 2)).mean() > 0.8  # transparent corners -> white
    assert "CC-BY 4.0" in data.attribution and "Twemoji" in data.attribution
    ds = load_dataset("emoji", image_size=32)
    image, cond = ds[0]
    label = cond["class_labels"]
    assert image.shape == (3, 32, 32) and label.item() == -1 and ds.num_classes == 0
