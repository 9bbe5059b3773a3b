"""Edge cases of image folders found by fuzzing ``difforge train FOLDER``: broken and looping
symlinks, unreadable sub-folders, very large images (the pixel limit and reduce-on-load) and
folders where every file is bad. Each must end in skipped-and-counted files or one clear
`DifforgeError`, never a traceback or a silent loss."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difforge.data import io as data_io
from difforge.data import list_image_files, load_dataset
from difforge.errors import DifforgeError

RNG = np.random.default_rng(1)


def noise(height: int, width: int, channels: int = 3) -> np.ndarray:
    """Random uint8 (H, W, C) pixels."""
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


def save(path: Path, img: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def good_images(root: Path, count: int = 2, side: int = 12) -> list[Path]:
    return [save(root / f"good{i}.png", Image.fromarray(noise(side, side))) for i in range(count)]


def reasons(skipped: list[tuple[str, str]]) -> dict[str, str]:
    return dict(skipped)


# ---------------------------------------------------------------- 1. symlinks
@pytest.fixture()
def symlink_folder(tmp_path: Path) -> Path:
    """Two good images, a valid link to one, a dangling link and a two-link loop."""
    root = tmp_path / "links"
    good = good_images(root)
    os.symlink(good[0], root / "alias.png")  # a valid link is an ordinary image
    os.symlink(root / "missing.png", root / "dangling.png")
    os.symlink(root / "loop_b.jpg", root / "loop_a.jpg")
    os.symlink(root / "loop_a.jpg", root / "loop_b.jpg")
    return root


@pytest.mark.parametrize("cache", [True, False])
def test_broken_and_looping_symlinks_are_skipped_and_counted(
    symlink_folder: Path, cache: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="difforge.data"):
        ds = load_dataset(symlink_folder, image_size=8, cache=cache)
    assert len(ds) == 3  # good0, good1 and the valid alias
    why = reasons(ds.skipped)
    assert set(why) == {"dangling.png", "loop_a.jpg", "loop_b.jpg"}
    assert "broken symlink" in why["dangling.png"] and "missing.png" in why["dangling.png"]
    assert why["loop_a.jpg"] == why["loop_b.jpg"] == "symlink loop"
    assert "3 unreadable files skipped" in ds.summary()
    assert sum("skipped 3 of 6" in r.getMessage() for r in caplog.records) == 1
    for i in range(len(ds)):
        assert ds[i][0].shape == (3, 8, 8)


def test_list_image_files_leaves_out_broken_symlinks(symlink_folder: Path) -> None:
    rel = [p.relative_to(symlink_folder).as_posix() for p in list_image_files(symlink_folder)]
    assert rel == ["alias.png", "good0.png", "good1.png"]
    listing = data_io.scan_image_folder(symlink_folder)
    assert [name for name, _ in listing.skipped] == ["dangling.png", "loop_a.jpg", "loop_b.jpg"]
    assert len(listing.stats) == len(listing.files) == 3


def test_special_file_with_an_image_name_is_skipped(tmp_path: Path) -> None:
    good_images(tmp_path)
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block for ever
    ds = load_dataset(tmp_path, image_size=8)
    assert len(ds) == 2 and reasons(ds.skipped) == {"pipe.png": "not a regular file"}


# ---------------------------------------------------------------- 2. unreadable folders
@pytest.fixture()
def locked(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """Paths added to the yielded set cannot be listed: `os.scandir` raises PermissionError
    for them, as it does for a chmod 000 folder of another user (the tests run as root, whom
    permission bits do not stop)."""
    blocked: set[str] = set()
    real_scandir = os.scandir

    def scandir(path: str | os.PathLike[str] = ".") -> object:
        if os.path.abspath(os.fspath(path)) in blocked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    yield blocked


def test_unreadable_subfolder_is_counted(
    tmp_path: Path, locked: set[str], caplog: pytest.LogCaptureFixture
) -> None:
    good_images(tmp_path / "open")
    good_images(tmp_path / "locked" / "inner")
    locked.add(str(tmp_path / "locked"))
    with caplog.at_level("WARNING", logger="difforge.data"):
        ds = load_dataset(tmp_path, image_size=8)
    assert len(ds) == 2
    assert reasons(ds.skipped) == {"locked/": "unreadable folder: Permission denied"}
    assert "locked/ (unreadable folder: Permission denied)" in ds.summary()
    assert sum("skipped 1 unreadable folder in" in r.getMessage() for r in caplog.records) == 1
    listing = data_io.scan_image_folder(tmp_path)
    assert listing.skipped == [("locked/", "unreadable folder: Permission denied")]


def test_unreadable_root_or_only_unreadable_folders_are_one_line_errors(
    tmp_path: Path, locked: set[str]
) -> None:
    good_images(tmp_path / "locked")
    locked.add(str(tmp_path / "locked"))
    with pytest.raises(DifforgeError, match="no image files.*1 folder could not be read.*locked/") as info:
        load_dataset(tmp_path, image_size=8)
    assert "\n" not in str(info.value)
    locked.add(str(tmp_path))
    with pytest.raises(DifforgeError, match="cannot read data folder.*Permission denied"):
        load_dataset(tmp_path, image_size=8)


def test_class_folders_keep_the_ids_of_unreadable_or_broken_classes(tmp_path: Path, locked: set[str]) -> None:
    good_images(tmp_path / "cat")
    good_images(tmp_path / "dog")
    (tmp_path / "eel").mkdir()
    os.symlink(tmp_path / "gone.png", tmp_path / "eel" / "x.png")  # a class of broken links
    os.symlink(tmp_path / "gone.png", tmp_path / "loose.png")  # skipped, not a loose image
    locked.add(str(tmp_path / "dog"))
    ds = load_dataset(tmp_path, image_size=8, class_folders=True)
    assert ds.class_names == ["cat", "dog", "eel"] and len(ds) == 2
    assert set(reasons(ds.skipped)) == {"dog/", "eel/x.png", "loose.png"}
    assert [int(ds[i][1]["class_labels"]) for i in range(len(ds))] == [0, 0]


def test_chmod_000_folder_is_counted(tmp_path: Path) -> None:
    good_images(tmp_path)
    good_images(tmp_path / "locked")
    (tmp_path / "locked").chmod(0)
    try:
        try:
            os.listdir(tmp_path / "locked")
        except PermissionError:
            ds = load_dataset(tmp_path, image_size=8)
        else:
            pytest.skip("this user reads chmod 000 folders (root); the test above fakes it")
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert len(ds) == 2 and reasons(ds.skipped) == {"locked/": "unreadable folder: Permission denied"}


# ---------------------------------------------------------------- 3. large images
def test_image_over_the_pixel_limit_is_skipped_with_size_and_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(tmp_path / "small.png", Image.fromarray(noise(20, 20)))  # 400 pixels
    save(tmp_path / "big.png", Image.fromarray(noise(30, 40)))  # 1,200 pixels
    save(tmp_path / "big.jpg", Image.fromarray(noise(30, 40)), quality=90)
    monkeypatch.setenv("DIFFORGE_MAX_IMAGE_PIXELS", "1000")
    ds = load_dataset(tmp_path, image_size=8)
    assert len(ds) == 1
    why = reasons(ds.skipped)
    assert set(why) == {"big.png", "big.jpg"}
    for reason in why.values():
        assert "40x30" in reason and "1,200" in reason and "1,000" in reason
        assert "DIFFORGE_MAX_IMAGE_PIXELS" in reason
    monkeypatch.delenv("DIFFORGE_MAX_IMAGE_PIXELS")
    monkeypatch.setattr(data_io, "MAX_IMAGE_PIXELS", 1000)  # the module default, when unset
    assert {name for name, _ in load_dataset(tmp_path, image_size=8).skipped} == {"big.png", "big.jpg"}
    monkeypatch.setenv("DIFFORGE_MAX_IMAGE_PIXELS", "1_200")  # the variable wins over the default
    assert len(load_dataset(tmp_path, image_size=8)) == 3


@pytest.mark.parametrize("value", ["many", "0", "-5", "1.5"])
def test_bad_pixel_limit_variable_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    good_images(tmp_path)
    monkeypatch.setenv("DIFFORGE_MAX_IMAGE_PIXELS", value)
    with pytest.raises(DifforgeError, match="DIFFORGE_MAX_IMAGE_PIXELS") as info:
        load_dataset(tmp_path, image_size=8)
    assert "\n" not in str(info.value)


def test_pillow_bomb_check_neither_escapes_nor_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's own limit (warning above it, error above twice it) is replaced by difforge's
    inside the data layer, and left working for everyone else."""
    save(tmp_path / "warned.png", Image.fromarray(noise(20, 30)))  # 600 > Pillow's 500
    save(tmp_path / "refused.png", Image.fromarray(noise(40, 40)))  # 1,600 > 2 x 500
    save(tmp_path / "refused.jpg", Image.fromarray(noise(40, 40)), quality=90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        ds = load_dataset(tmp_path, image_size=8)
        assert len(ds) == 3 and ds.skipped == []
        monkeypatch.setenv("DIFFORGE_MAX_IMAGE_PIXELS", "1000")
        ds = load_dataset(tmp_path, image_size=8)
        assert len(ds) == 1 and "DIFFORGE_MAX_IMAGE_PIXELS" in reasons(ds.skipped)["refused.png"]
    with pytest.raises(Image.DecompressionBombError), Image.open(tmp_path / "refused.png"):
        pass  # Pillow itself still protects code outside difforge
    with pytest.warns(Image.DecompressionBombWarning), Image.open(tmp_path / "warned.png"):
        pass


def smooth(height: int, width: int) -> np.ndarray:
    """A smooth colour gradient (reduce-then-resize matches a direct resize closely)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(
        np.uint8
    )


@pytest.mark.parametrize("name", ["big.png", "big.webp", "big.tif", "big.jpg"])
def test_large_images_are_reduced_while_decoding(tmp_path: Path, name: str) -> None:
    pixels = smooth(300, 420)
    path = save(tmp_path / name, Image.fromarray(pixels))
    img = data_io.open_image(path, "RGB", draft_size=16)
    assert 32 <= min(img.size) < 75 and img.size[0] > img.size[1]  # reduced, aspect kept
    full = data_io.open_image(path, "RGB")  # no draft size: full resolution
    assert full.size == (420, 300)
    ds = load_dataset(tmp_path, image_size=16)
    direct = full.resize((22, 16), Image.Resampling.BICUBIC).crop((3, 0, 19, 16))
    expected = np.asarray(direct, dtype=np.float32) / 127.5 - 1
    got = ds[0][0].permute(1, 2, 0).numpy()
    assert np.abs(got - expected).mean() < 0.02  # about 2.5 grey levels


def test_reduced_decoding_keeps_transparency_and_orientation(tmp_path: Path) -> None:
    rgba = np.zeros((160, 320, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, 160:, 3] = 255  # left half transparent, right half opaque red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = save(tmp_path / "rotated.png", Image.fromarray(rgba, "RGBA"), exif=exif)
    img = data_io.open_image(path, "RGB", draft_size=16)
    assert img.size[0] < img.size[1] < 160  # reduced, then turned upright (portrait)
    arr = np.asarray(img)
    assert (arr[: arr.shape[0] // 2 - 1] == 255).all()  # transparent half -> white, now on top
    assert (arr[arr.shape[0] // 2 + 1 :] == [255, 0, 0]).all()  # opaque red below


# ---------------------------------------------------------------- 4. every file bad
def test_train_on_a_folder_of_only_bad_files_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from difforge.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    os.symlink(bad / "gone.png", bad / "dangling.png")
    os.symlink(bad / "loop2.png", bad / "loop1.png")
    os.symlink(bad / "loop1.png", bad / "loop2.png")
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(links / "gone.png", links / "dangling.png")
    argv = ["--preset", "tiny", "--image-size", "16", "--steps", "1", "--no-tensorboard", "--no-progress"]
    for folder, count in ((bad, 5), (links, 1)):
        code = main(["train", str(folder), "--out", str(tmp_path / "run"), *argv])
        err = capsys.readouterr().err
        assert code == 2, err
        lines = [line for line in err.strip().splitlines() if line]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert f"none of the {count} image files" in lines[0] and str(folder) in lines[0]
    assert not (tmp_path / "run").exists()
