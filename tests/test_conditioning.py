"""Conditioning beyond class labels: label tables, paired condition images, super-resolution
inputs, noise-conditioning augmentation, and what reaches the model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from difforge.conditioning import (
    COND_NOISE_KEY,
    ImageCondition,
    MultiHotLabels,
    NoiseAugmentation,
    gaussian_blur,
    prepare_conditions,
)
from difforge.data import load_dataset
from difforge.data.pairing import read_label_table
from difforge.errors import DifforgeError
from difforge.nn import UNet, UNetConfig


def _grey(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


# ---- label tables ---------------------------------------------------------------------------


@pytest.fixture
def faces(tmp_path: Path) -> Path:
    """Six grey pictures a..f (in a shuffled creation order), one in a sub-folder."""
    names = ["a.png", "b.png", "c.png", "sub/d.png", "e.png", "f.png"]
    random.Random(3).shuffle(names)
    for name in names:
        _grey(tmp_path / "data" / name, 10 * (ord(Path(name).stem) - 96))
    return tmp_path / "data"


def _by_value(dataset: object) -> dict[int, torch.Tensor]:
    """Pixel value of each item (it names the file) -> its cond dict."""
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[index]
    return {round((float(image.mean()) + 1) * 127.5): cond for image, cond in items}


@pytest.mark.parametrize("form", ["names_csv", "attributes_csv", "json_dict", "json_list"])
def test_multi_hot_vectors_match_the_label_file(faces: Path, tmp_path: Path, form: str) -> None:
    truth = {
        "a.png": ["smiling", "glasses"],
        "b.png": ["glasses"],
        "sub/d.png": ["hat", "smiling"],
        "e.png": [],
    }
    table = tmp_path / ("labels.json" if form.startswith("json") else "labels.csv")
    if form == "names_csv":
        lines = ["file,labels"] + [f'{name},"{";".join(labels)}"' for name, labels in truth.items()]
        table.write_text("\n".join(lines) + "\nmissing.png,scarf\n")
    elif form == "attributes_csv":
        columns = ["glasses", "hat", "smiling"]
        lines = ["file," + ",".join(columns)]
        lines += [
            name + "," + ",".join("1" if c in labels else "-1" for c in columns)
            for name, labels in truth.items()
        ]
        table.write_text("\n".join(lines) + "\nmissing.png,1,-1,-1\n")
    elif form == "json_dict":
        table.write_text(json.dumps({**truth, "missing.png": ["scarf"]}))
    else:
        table.write_text(
            json.dumps([{"file": k, "labels": v} for k, v in {**truth, "missing.png": ["scarf"]}.items()])
        )

    dataset = load_dataset(faces, image_size=8, labels=table)
    assert dataset.multi_label and dataset.class_names == ["glasses", "hat", "smiling"]
    assert len(dataset) == 4 and sorted(name for name, _ in dataset.excluded) == ["c.png", "f.png"]
    notes = " ".join(dataset.notes)
    assert "2 images the table does not list" in notes and "missing.png" in notes
    if form != "attributes_csv":  # an attribute table has no label that only a missing file has
        assert "scarf" in notes
    values = {"a.png": 10, "b.png": 20, "sub/d.png": 40, "e.png": 50}
    items = _by_value(dataset)
    for name, labels in truth.items():
        expected = torch.tensor([float(c in labels) for c in dataset.class_names])
        assert torch.equal(items[values[name]]["class_labels"], expected), name


def test_label_tables_refuse_bad_files_with_one_line(faces: Path, tmp_path: Path) -> None:
    def refused(text: str, suffix: str = ".csv") -> str:
        path = tmp_path / f"bad{suffix}"
        path.write_text(text)
        with pytest.raises(DifforgeError) as error:
            load_dataset(faces, image_size=8, labels=path)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert "no such file" in str(pytest.raises(DifforgeError, read_label_table, tmp_path / "none.csv").value)
    assert "header row" in refused("file,labels\n")
    assert "listed twice" in refused("file,labels\na.png,x\na.png,y\n")
    assert "not valid JSON" in refused("{", ".json")
    assert "list of label names" in refused('{"a.png": 3}', ".json")
    assert "none of its 1 file names" in refused("file,labels\nzzz.png,x\n")
    assert "have no labels" in refused("file,labels\na.png,\n")
    assert "line 2 has 3 cells" in refused("file,labels\na.png,x,y\n")
    builtin = pytest.raises(DifforgeError, load_dataset, "digits", image_size=8, labels=tmp_path / "x.csv")
    assert "must be a folder" in str(builtin.value)


def test_a_file_name_matches_only_when_unambiguous(tmp_path: Path) -> None:
    _grey(tmp_path / "data/x/same.png", 10)
    _grey(tmp_path / "data/y/same.png", 20)
    table = tmp_path / "t.csv"
    table.write_text("file,labels\nsame.png,a\n")
    with pytest.raises(DifforgeError, match="could be x/same.png or y/same.png"):
        load_dataset(tmp_path / "data", image_size=8, labels=table)
    table.write_text("file,labels\ny/same.png,a\n")
    dataset = load_dataset(tmp_path / "data", image_size=8, labels=table)
    assert len(dataset) == 1 and _by_value(dataset).keys() == {20}


# ---- paired image-to-image ------------------------------------------------------------------


def test_pairs_are_made_by_name_never_by_position(tmp_path: Path) -> None:
    stems = [f"img{i:02d}" for i in range(12)]
    order = stems[:]
    random.Random(0).shuffle(order)
    for stem in order:  # targets in one order, conditions in another, other extensions
        _grey(tmp_path / "targets" / f"{stem}.png", 10 + 10 * stems.index(stem))
    for stem in reversed(order):
        if stem != "img05":
            rgb = np.zeros((8, 8, 3), dtype=np.uint8)
            rgb[..., 0] = 200 - 10 * stems.index(stem)  # red names the target; a colour picture
            Image.fromarray(rgb).save(_touch(tmp_path / "conds", f"{stem}.bmp"))
    _grey(tmp_path / "conds" / "orphan.png", 7)
    dataset = load_dataset(tmp_path / "targets", image_size=8, cond_dir=tmp_path / "conds", hflip=True)
    assert len(dataset) == 11 and dataset.paired is not None and dataset.paired.channels == 3
    assert [name for name, _ in dataset.excluded] == ["img05.png"]
    assert any("orphan.png" in note for note in dataset.notes)
    for i in range(len(dataset)):
        image, cond = dataset[i]
        index = (round((float(image.mean()) + 1) * 127.5) - 10) // 10
        assert cond["image_cond"].shape == (3, 8, 8)
        assert round((float(cond["image_cond"][0].mean()) + 1) * 127.5) == 200 - 10 * index


def _touch(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_a_paired_condition_is_flipped_with_its_target(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))
    Image.fromarray(ramp).save(_touch(tmp_path / "t", "a.png"))
    Image.fromarray(ramp).save(_touch(tmp_path / "c", "a.png"))
    dataset = load_dataset(tmp_path / "t", image_size=8, cond_dir=tmp_path / "c", hflip=True)
    torch.manual_seed(0)
    for _ in range(8):
        image, cond = dataset[0]
        assert torch.equal(image, cond["image_cond"])  # identical pictures stay identical


def test_paired_data_refuses_what_it_cannot_pair(tmp_path: Path) -> None:
    _grey(tmp_path / "t/a.png", 1)
    _grey(tmp_path / "c/b.png", 1)
    with pytest.raises(DifforgeError, match="no file pairs"):
        load_dataset(tmp_path / "t", image_size=8, cond_dir=tmp_path / "c")
    with pytest.raises(DifforgeError, match="does not exist"):
        load_dataset(tmp_path / "t", image_size=8, cond_dir=tmp_path / "nowhere")
    with pytest.raises(DifforgeError, match="random-crop"):
        load_dataset(tmp_path / "t", image_size=8, cond_dir=tmp_path / "c", random_crop=True)
    _grey(tmp_path / "c/a.png", 1)
    _grey(tmp_path / "c/a.jpg", 1)
    with pytest.raises(DifforgeError, match="same name"):
        load_dataset(tmp_path / "t", image_size=8, cond_dir=tmp_path / "c")


# ---- super-resolution -----------------------------------------------------------------------


def test_the_super_resolution_input_is_the_8_bit_area_average_of_the_target() -> None:
    dataset = load_dataset("digits", image_size=16, low_res=8, hflip=True)
    torch.manual_seed(1)
    for index in (0, 5, 100):
        image, cond = dataset[index]
        pixels = np.rint((image.numpy().astype(np.float64) + 1) * 127.5)
        blocks = pixels.reshape(1, 8, 2, 8, 2).mean(axis=(2, 4))  # exact 2 x 2 block means
        expected = np.round(blocks) / 127.5 - 1  # to the nearest 8-bit level, ties to even
        assert cond["image_cond"].shape == (1, 8, 8)
        assert np.allclose(cond["image_cond"].numpy(), expected, atol=1e-6)


def test_the_model_sees_the_low_res_input_upsampled_bilinearly() -> None:
    model = UNet(UNetConfig.preset("tiny", image_size=16, in_channels=1, image_cond_channels=1)).eval()
    seen: list[torch.Tensor] = []
    model.conv_in.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    low = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        model(torch.zeros(2, 1, 16, 16), torch.tensor([3, 4]), image_cond=low)
    upsampled = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(seen[0][:, 1:].contiguous(), upsampled, atol=1e-6)


def test_noise_augmentation_is_the_variance_preserving_path() -> None:
    augmentation = NoiseAugmentation(max_level=0.5)
    image = torch.rand(4, 1, 8, 8) * 2 - 1
    level = torch.tensor([0.0, 0.25, 0.5, 1.0])
    noisy = augmentation.corrupt(image, level, torch.Generator().manual_seed(0))
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    angle = level.double() * np.pi / 2
    expected = (
        torch.cos(angle)[:, None, None, None] * image.double() + torch.sin(angle)[:, None, None, None] * noise
    )
    assert torch.allclose(noisy.double(), expected, atol=1e-6)
    assert torch.equal(noisy[0], image[0])
    _, drawn = augmentation.train(image.repeat(64, 1, 1, 1), torch.Generator().manual_seed(1))
    assert float(drawn.min()) >= 0 and float(drawn.max()) <= 0.5 and float(drawn.std()) > 0.1


def test_blur_augmentation_equals_scipy() -> None:
    images = torch.rand(3, 2, 12, 12, dtype=torch.float64)
    sigma = torch.tensor([0.0, 0.7, 1.3], dtype=torch.float64)
    blurred = gaussian_blur(images, sigma)
    radius = int(np.ceil(3 * 1.3))
    assert torch.equal(blurred[0], images[0])
    for b in (1, 2):
        for c in range(2):
            expected = images[b, c].numpy()
            for axis in (0, 1):
                expected = ndimage.gaussian_filter1d(
                    expected, float(sigma[b]), axis=axis, mode="mirror", radius=radius
                )
            assert np.allclose(blurred[b, c].numpy(), expected, atol=1e-12)


def test_the_augmentation_level_reaches_the_model_and_changes_its_output() -> None:
    conditions = {"image_cond": ImageCondition(8, 1, NoiseAugmentation(0.5))}
    raw = {"image_cond": torch.zeros(6, 1, 8, 8)}
    trained = prepare_conditions(raw, conditions, generator=torch.Generator().manual_seed(0))
    assert trained[COND_NOISE_KEY].shape == (6,) and float(trained[COND_NOISE_KEY].max()) <= 0.5
    sampled = prepare_conditions(raw, conditions, cond_noise=0.2, generator=torch.Generator())
    assert torch.equal(sampled[COND_NOISE_KEY], torch.full((6,), 0.2))
    config = UNetConfig.preset(
        "tiny", image_size=16, in_channels=1, image_cond_channels=1, cond_noise_embed=True
    )
    model = UNet(config).eval()
    for parameter in model.parameters():  # zero-initialised branches would hide the embedding
        if not parameter.any():
            torch.nn.init.normal_(parameter, std=0.05)
    x, t, cond = torch.zeros(2, 1, 16, 16), torch.tensor([5, 5]), torch.zeros(2, 1, 8, 8)
    with torch.no_grad():
        low = model(x, t, image_cond=cond, cond_noise_level=torch.tensor([0.0, 0.0]))
        high = model(x, t, image_cond=cond, cond_noise_level=torch.tensor([0.0, 0.6]))
        default = model(x, t, image_cond=cond)
    assert torch.equal(low[0], high[0]) and not torch.allclose(low[1], high[1])
    assert torch.equal(default, low)  # no level = a clean condition
    with pytest.raises(DifforgeError, match="without cond_noise_embed"):
        UNet(UNetConfig.preset("tiny", image_size=16, in_channels=1, image_cond_channels=1))(
            x, t, image_cond=cond, cond_noise_level=torch.zeros(2)
        )


def test_dropout_nulls_exactly_the_kind_drawn() -> None:
    conditions = {"class_labels": MultiHotLabels(3), "image_cond": ImageCondition()}
    labels = torch.tensor([[1.0, 0.0, 1.0]]).repeat(400, 1)
    images = torch.ones(400, 1, 2, 2)
    prepared = prepare_conditions(
        {"class_labels": labels, "image_cond": images},
        conditions,
        p_uncond=0.3,
        generator=torch.Generator().manual_seed(0),
    )
    label_dropped = (prepared["class_labels"] == 0).all(dim=1)
    image_dropped = (prepared["image_cond"] == 0).flatten(1).all(dim=1)
    assert torch.equal(prepared["class_labels"][~label_dropped], labels[~label_dropped])
    assert torch.equal(prepared["image_cond"][~image_dropped], images[~image_dropped])
    assert 0.2 < float(label_dropped.float().mean()) < 0.4 and 0.2 < float(image_dropped.float().mean()) < 0.4
    assert not torch.equal(label_dropped, image_dropped)  # each kind on its own draw
    generator = torch.Generator().manual_seed(0)
    draws = torch.rand(400, generator=generator) < 0.3, torch.rand(400, generator=generator) < 0.3
    assert torch.equal(label_dropped, draws[0]) and torch.equal(image_dropped, draws[1])


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NAME = (
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789 ", min_size=1, max_size=8)
    .map(str.strip)
    .filter(bool)
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    table=st.dictionaries(
        _NAME.map(lambda name: f"{name}.png"),
        st.lists(_NAME, max_size=4, unique=True),
        min_size=1,
        max_size=8,
    ),
    form=st.sampled_from(["names_csv", "attributes_csv", "json"]),
)
def test_every_table_form_reads_back_what_was_written(
    tmp_path_factory: pytest.TempPathFactory, table: dict[str, list[str]], form: str
) -> None:
    import csv

    folder = tmp_path_factory.mktemp("tables")
    vocabulary = sorted({label for labels in table.values() for label in labels})
    path = folder / ("t.json" if form == "json" else "t.csv")
    if form == "json":
        path.write_text(json.dumps(table))
    else:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            if form == "names_csv":
                writer.writerow(["file", "labels"])
                writer.writerows([name, ";".join(labels)] for name, labels in table.items())
            else:
                writer.writerow(["file", *vocabulary] if vocabulary else ["file", "labels"])
                writer.writerows(
                    [name, *("1" if v in labels else "0" for v in vocabulary)]
                    for name, labels in table.items()
                )
    read = read_label_table(path)
    assert {name: sorted(labels) for name, labels in read.items()} == {k: sorted(v) for k, v in table.items()}
