"""vqgen.core.data.shapes and vqgen.core.data.images: every source kind, built in tmp_path, and every user mistake."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vqgen.core.data.images import DataConfig, ImageDataset, ImageSplit, load_image_data, to_model_range, to_uint8
from vqgen.core.data.shapes import SHAPE_NAMES, make_shapes
from vqgen.core.runtime.errors import VQGenError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def save(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 8), color=0) -> Path:
    """Write a plain image, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def grey(value: int, size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("L", size, value)


def table(n: int, offset: int = 0) -> dict:
    """n grey images whose pixel value is 10 * (row + offset), with that row number as the label."""
    return {"image": [grey(10 * (i + offset)) for i in range(n)], "label": list(range(offset, offset + n))}


LABELLED = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
NUMBERED = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})


def write_parquet(rows: dict, path: Path, features: datasets.Features | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """Keep the lock files `datasets` writes out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))


def load(source, **kwargs):
    return load_image_data(DataConfig(source=str(source), **kwargs))


def one_line_error(match: str, **kwargs) -> str:
    """Loading fails with a one-line VQGenError that contains `match`."""
    with pytest.raises(VQGenError) as info:
        load_image_data(DataConfig(**kwargs))
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


# --- built-in shapes -------------------------------------------------------------------------


def test_make_shapes_shapes_dtypes_and_classes():
    x, y, names = make_shapes(24, seed=0, size=16)
    assert x.shape == (24, 3, 16, 16) and x.dtype == torch.uint8
    assert y.shape == (24,) and y.dtype == torch.int64
    assert names == list(SHAPE_NAMES) and len(names) == 6
    assert torch.bincount(y, minlength=6).tolist() == [4] * 6  # balanced: every class present
    assert x.min() < 80 and x.max() > 200  # dark background, bright shapes


def test_make_shapes_deterministic_per_seed():
    a, ya, _ = make_shapes(12, seed=3, size=16)
    b, yb, _ = make_shapes(12, seed=3, size=16)
    c, _, _ = make_shapes(12, seed=4, size=16)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)


def test_make_shapes_is_fast():
    start = time.perf_counter()
    make_shapes(2000, seed=0)
    assert time.perf_counter() - start < 5.0  # ~0.1 s on an idle core; generous for shared CI machines


def test_builtin_source_splits():
    cfg = DataConfig(builtin_train_size=18, builtin_test_size=12, image_size=16)
    data = load_image_data(cfg)
    assert data.train.images.shape == (18, 3, 16, 16) and data.test.images.shape == (12, 3, 16, 16)
    assert (data.channels, data.height, data.width, data.num_classes) == (3, 16, 16, 6)
    assert data.class_names == list(SHAPE_NAMES)
    assert not torch.equal(data.train.images[:12], data.test.images)  # disjoint streams
    again = load_image_data(cfg)
    assert torch.equal(again.train.images, data.train.images) and torch.equal(again.test.labels, data.test.labels)
    other = load_image_data(DataConfig(builtin_train_size=18, builtin_test_size=12, image_size=16, seed=1))
    assert not torch.equal(other.train.images, data.train.images)
    assert len(load_image_data(DataConfig(max_images=5, image_size=16)).train) == 5
    unlabelled = load_image_data(DataConfig(max_images=6, image_size=8, label_column="none"))
    assert unlabelled.train.labels is None and unlabelled.class_names is None


# --- image folders ---------------------------------------------------------------------------


def test_folder_with_class_subfolders(tmp_path):
    for i in range(3):
        save(tmp_path / "cat" / f"{i}.png", color=RED)
        save(tmp_path / "dog" / "nested" / f"{i}.JPG", color=BLUE)  # extension case, nesting
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    data = load(tmp_path, test_fraction=0.5)
    assert data.class_names == ["cat", "dog"]
    assert len(data.train) == 3 and len(data.test) == 3
    for split in (data.train, data.test):
        red = split.images[:, 0, 0, 0] > 200
        assert torch.equal(split.labels, (~red).long())  # cat is red, dog is blue


def test_folder_never_imports_datasets(tmp_path, monkeypatch):
    """An image folder is read without `datasets`: its import is skipped, not merely unused."""
    for i in range(2):
        save(tmp_path / "a" / f"{i}.png")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    data = load(tmp_path, test_fraction=0.5)
    assert len(data.train) == 1 and data.class_names == ["a"]


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(4):
        save(tmp_path / f"{i}.png", color=(i * 60, 0, 0))
    data = load(tmp_path, test_fraction=0.25)
    assert data.class_names is None and data.num_classes == 0
    assert data.train.labels is None and data.test.labels is None
    assert ImageDataset(data.train)[0]["label"].item() == -1


def test_column_options_on_a_folder(tmp_path):
    save(tmp_path / "a" / "0.png")
    save(tmp_path / "b" / "0.png")
    data = load(tmp_path, label_column="none")
    assert data.class_names is None and data.train.labels is None
    one_line_error("image_column='img'", source=str(tmp_path), image_column="img")


def test_folder_with_split_subfolders(tmp_path):
    for i in range(3):
        save(tmp_path / "train" / "a" / f"{i}.png")
        save(tmp_path / "train" / "b" / f"{i}.png")
    save(tmp_path / "test" / "b" / "0.png")
    data = load(tmp_path)
    assert len(data.train) == 6 and len(data.test) == 1
    assert data.class_names == ["a", "b"] and data.test.labels.tolist() == [1]


@pytest.mark.parametrize(
    ("modes", "channels"),
    [(["L", "L"], 1), (["1", "I;16"], 1), (["LA", "L"], 1), (["L", "RGB"], 3), (["RGBA", "P"], 3), (["CMYK"], 3)],
)
def test_folder_channels_come_from_the_data(tmp_path, modes, channels):
    for i, mode in enumerate(modes + modes):
        save(tmp_path / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}", mode=mode)
    data = load(tmp_path)
    assert data.channels == channels and data.test.images.shape[1] == channels


def test_transparency_is_composited_onto_black(tmp_path):
    for i in range(2):
        save(tmp_path / f"{i}.png", mode="RGBA", color=(255, 255, 255, 0))
    data = load(tmp_path)
    assert data.train.images.max() == 0


# --- `datasets` files ------------------------------------------------------------------------


def test_parquet_folder_with_train_and_test(tmp_path):
    train = {"image": [grey(i) for i in range(6)], "label": [0, 1, 2, 0, 1, 2]}
    test = {"image": [grey(100), grey(101)], "label": [2, 1]}
    write_parquet(train, tmp_path / "data" / "train-00000-of-00001.parquet", LABELLED)
    write_parquet(test, tmp_path / "data" / "test-00000-of-00001.parquet", LABELLED)
    data = load(tmp_path)
    assert data.class_names == ["a", "b", "c"]
    assert data.train.images.shape == (6, 1, 8, 8) and data.train.images.dtype == torch.uint8
    assert data.train.images[:, 0, 0, 0].tolist() == list(range(6))
    assert data.test.labels.tolist() == [2, 1] and data.test.images[:, 0, 0, 0].tolist() == [100, 101]
    assert len(load(tmp_path, max_images=2).train) == 2


def test_a_local_dataset_card_without_metadata_is_read_in_silence(tmp_path, caplog):
    """The Hub client logs "Repo card metadata block was not found" for a README.md with no YAML header, as
    a downloaded copy of MNIST may have: noise in every command's output, not the user's business."""
    write_parquet(table(4), tmp_path / "data" / "train-00000-of-00001.parquet", NUMBERED)
    write_parquet(table(2, 4), tmp_path / "data" / "test-00000-of-00001.parquet", NUMBERED)
    (tmp_path / "README.md").write_text("# digits\n\nA card with prose only.\n")
    with caplog.at_level(logging.WARNING):
        assert len(load(tmp_path).train) == 4
    assert "metadata" not in caplog.text


def test_single_parquet_holds_out_a_fixed_fraction(tmp_path):
    path = write_parquet(table(10), tmp_path / "all.parquet")
    data = load(path, test_fraction=0.3)
    assert len(data.train) == 7 and len(data.test) == 3
    assert sorted(data.train.labels.tolist() + data.test.labels.tolist()) == list(range(10))  # disjoint, complete
    assert data.class_names == [str(i) for i in range(10)]  # plain ints name themselves
    assert torch.equal(data.train.images[:, 0, 0, 0].long(), 10 * data.train.labels)  # images stay with labels
    assert torch.equal(load(path, test_fraction=0.3).test.labels, data.test.labels)
    assert not torch.equal(load(path, test_fraction=0.3, seed=1).test.labels, data.test.labels)


@pytest.mark.parametrize("as_dict", [True, False])
def test_save_to_disk_folder(tmp_path, as_dict):
    train = datasets.Dataset.from_dict(table(4), features=NUMBERED)
    if as_dict:
        test = datasets.Dataset.from_dict(table(2, offset=4), features=train.features)
        datasets.DatasetDict({"train": train, "validation": test}).save_to_disk(str(tmp_path / "saved"))
    else:
        train.save_to_disk(str(tmp_path / "saved"))
    data = load(tmp_path / "saved", test_fraction=0.5)
    assert data.channels == 1 and data.class_names == [str(i) for i in range(6 if as_dict else 4)]
    assert (len(data.train), len(data.test)) == ((4, 2) if as_dict else (2, 2))


def test_explicit_image_and_label_columns(tmp_path):
    features = datasets.Features(
        {"photo": datasets.Image(), "thumb": datasets.Image(), "kind": datasets.Value("string")}
    )
    rows = {"photo": [grey(200)] * 4, "thumb": [grey(7, (4, 4))] * 4, "kind": ["dog", "cat", "dog", "cat"]}
    write_parquet(rows, tmp_path / "x.parquet", features)
    auto = load(tmp_path / "x.parquet")
    assert auto.height == 8 and auto.train.labels is None  # first Image column; no known label name
    chosen = load(tmp_path / "x.parquet", image_column="thumb", label_column="kind", test_fraction=0.5)
    assert chosen.height == 4 and chosen.class_names == ["cat", "dog"]
    assert sorted(chosen.train.labels.tolist() + chosen.test.labels.tolist()) == [0, 0, 1, 1]


def test_label_column_none_ignores_labels(tmp_path):
    write_parquet(table(3), tmp_path / "x.parquet", NUMBERED)
    data = load(tmp_path / "x.parquet", label_column="none")
    assert data.class_names is None and data.train.labels is None


# --- sizes -----------------------------------------------------------------------------------


def stripes(path: Path) -> None:
    """12 wide, 4 high: red, green, blue thirds."""
    img = np.zeros((4, 12, 3), dtype=np.uint8)
    img[:, :4, 0] = img[:, 4:8, 1] = img[:, 8:, 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def test_resize_modes(tmp_path):
    stripes(tmp_path / "0.png")
    stripes(tmp_path / "1.png")
    stretched = load(tmp_path, image_size=4).train.images[0]  # (3, 4, 4)
    assert stretched.shape == (3, 4, 4) and stretched[0, 0, 0] > 200 and stretched[2, 0, -1] > 200
    cropped = load(tmp_path, image_size=4, resize_mode="center-crop").train.images[0]
    assert cropped.shape == (3, 4, 4) and (cropped[1] > 200).all() and (cropped[0] < 50).all()
    padded = load(tmp_path, image_size=16, resize_mode="pad").train.images[0]
    assert padded.shape == (3, 16, 16)
    assert padded[:, :6].sum() == 0 and padded[:, 10:].sum() == 0 and padded[:, :, :2].sum() == 0
    original = torch.from_numpy(np.array(Image.open(tmp_path / "0.png"))).permute(2, 0, 1)  # (3, 4, 12)
    assert torch.equal(padded[:, 6:10, 2:14], original)


def test_mixed_sizes_are_refused_unless_resized(tmp_path):
    save(tmp_path / "a.png", size=(8, 8))
    save(tmp_path / "b.png", size=(10, 6))
    with pytest.raises(VQGenError, match=r"(8x8.*10x6|10x6.*8x8).*give --image-size N"):
        load(tmp_path, test_fraction=0.5)
    assert load(tmp_path, image_size=8).height == 8


# --- model range -----------------------------------------------------------------------------


def test_model_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8)
    y = to_model_range(x)
    assert y.dtype == torch.float32 and y.min() == -1.0 and y.max() == 1.0
    assert torch.equal(to_uint8(y), x)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_image_dataset_items():
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    ds = ImageDataset(ImageSplit(images, torch.arange(5)))
    item = ds[2]
    assert len(ds) == 5 and set(item) == {"image", "label", "index"}
    assert item["image"].shape == (3, 4, 4) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert torch.equal(to_uint8(item["image"]), images[2])
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0 and item["label"].item() == 2
    assert item["index"].dtype == torch.int64 and item["index"].item() == 2
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 3, 4, 4) and batch["label"].shape == (5,)


# --- user mistakes ---------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["nope/deeper/dir", "./nope", "nope.parquet", "/definitely/not/here"])
def test_missing_path(tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    message = one_line_error(missing, source=missing)
    assert "not found" in message and "hub" in message


def test_missing_path_whose_parent_exists_is_not_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    start = time.perf_counter()
    one_line_error("not found", source="data/mnist")
    assert time.perf_counter() - start < 1.0


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    one_line_error(str(tmp_path), source=str(tmp_path))


def test_corrupt_image_is_named(tmp_path):
    save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    one_line_error(str(tmp_path / "bad.png"), source=str(tmp_path))


def test_corrupt_image_in_parquet_names_the_row(tmp_path):
    rows = {"image": [{"bytes": b"garbage", "path": None}, {"bytes": b"garbage", "path": None}]}
    write_parquet(rows, tmp_path / "x.parquet", datasets.Features({"image": datasets.Image()}))
    message = one_line_error("not a recognised image format", source=str(tmp_path / "x.parquet"))
    assert "row 1 of split 'train'" in message  # row 0 is held out as the test split


def test_mixed_class_and_loose_images(tmp_path):
    save(tmp_path / "loose.png")
    save(tmp_path / "cls" / "a.png")
    one_line_error("loose.png", source=str(tmp_path))


def test_pad_smaller_than_image(tmp_path):
    save(tmp_path / "big.png", size=(12, 12))
    save(tmp_path / "small.png", size=(4, 4))
    one_line_error("big.png", source=str(tmp_path), image_size=8, resize_mode="pad")


def test_missing_columns(tmp_path):
    path = write_parquet(table(3), tmp_path / "x.parquet")
    assert "'image'" in one_line_error("'photo'", source=str(path), image_column="photo")  # lists the columns
    one_line_error("'kind'", source=str(path), label_column="kind")
    write_parquet({"text": ["a", "b"]}, tmp_path / "t.parquet")
    one_line_error("'text'", source=str(tmp_path / "t.parquet"))


def test_empty_split(tmp_path):
    write_parquet(table(3), tmp_path / "data" / "train-0.parquet", LABELLED)
    write_parquet({"image": [], "label": []}, tmp_path / "data" / "test-0.parquet", LABELLED)
    one_line_error("'test'", source=str(tmp_path))


@pytest.mark.parametrize(
    ("field", "value"),
    [("test_fraction", 0.0), ("test_fraction", 1.5), ("image_size", 0), ("resize_mode", "squash"),
     ("max_images", 0), ("builtin_train_size", 0), ("source", "")],
)
def test_bad_config_values(field, value):
    with pytest.raises(VQGenError, match=field) as info:
        DataConfig(**{field: value})
    assert repr(value) in str(info.value)


def test_hub_failure_is_quick_and_one_line():
    start = time.perf_counter()
    one_line_error("vqgen-tests/no-such-dataset", source="vqgen-tests/no-such-dataset")
    assert time.perf_counter() - start < 15.0
