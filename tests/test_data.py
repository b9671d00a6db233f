"""The dataset layer: each test checks a fact about the files or the splits, not the code's output.

Synthetic sets are generated at 32 px with a handful of images per class, so the file runs in
seconds; CIFAR batches are written by the test in the official pickle layout.
"""

import hashlib
import json
import os
import pickle
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from sslbench.data import (
    DATASETS,
    SHAPE_CLASSES,
    SPLITS,
    DatasetError,
    build_dataset,
    default_data_root,
    prepare_synthetic_shapes,
)
from sslbench.data.splits import stratified_split

# pycocotools' Cython code trips numpy 2's __array__(copy=) deprecation inside annToMask
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TINY = dict(image_size=32, train_per_class=3, val_per_class=2, test_per_class=2, progress=False)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return prepare_synthetic_shapes(tmp_path_factory.mktemp("shapes"), seed=0, **TINY)


# --- synthetic-shapes: determinism and caching ---------------------------------------------------


def test_same_seed_gives_identical_files_and_another_seed_different_ones(tmp_path, tiny_root):
    again = tree_digest(prepare_synthetic_shapes(tmp_path / "again", seed=0, **TINY))
    other = tree_digest(prepare_synthetic_shapes(tmp_path / "other", seed=1, **TINY))
    first = tree_digest(tiny_root)
    assert again == first
    assert set(other) == set(first)
    images = [f for f in first if f.startswith("train/")]
    assert len(images) == 3 * len(SHAPE_CLASSES)
    assert all(other[f] != first[f] for f in images)


def test_cache_hit_rewrites_nothing_and_other_params_are_refused(tiny_root):
    before = {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*") if p.is_file()}
    build_dataset("synthetic-shapes", tiny_root, "train", seed=0, **TINY)
    assert {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*") if p.is_file()} == before
    with pytest.raises(DatasetError, match="train_per_class") as err:
        build_dataset("synthetic-shapes", tiny_root, "train", **{**TINY, "train_per_class": 4})
    assert str(tiny_root) in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*") if p.is_file()} == before


def test_interrupted_generation_is_completed_in_place(tmp_path, tiny_root):
    root = prepare_synthetic_shapes(tmp_path / "s", seed=0, **{**TINY, "train_per_class": 5})
    (root / "meta.json").unlink()  # as if killed before the end; its extra images are now stale
    (root / "val" / "star" / "000001.png").write_bytes(b"truncated")
    prepare_synthetic_shapes(root, seed=0, **TINY)
    assert tree_digest(root) == tree_digest(tiny_root)


def test_generator_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="notes.txt"):
        prepare_synthetic_shapes(tmp_path, **TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_unknown_generation_option_names_the_closest(tmp_path):
    with pytest.raises(DatasetError, match="did you mean 'seed'"):
        build_dataset("synthetic-shapes", tmp_path, "train", sed=1)


# --- synthetic-shapes: the three formats agree --------------------------------------------------


def test_synthetic_split_reads_back_as_an_imagefolder(tiny_root):
    sizes = {"train": 3, "val": 2, "test": 2}
    for split in SPLITS:
        ds = build_dataset("synthetic-shapes", tiny_root, split, **TINY)
        assert ds.classes == sorted(SHAPE_CLASSES) and ds.num_classes == 8
        assert len(ds) == len(ds.targets) == len(ds.files) == 8 * sizes[split]
        assert Counter(ds.targets) == {k: sizes[split] for k in range(8)}
        image, label = ds[len(ds) - 1]
        assert image.mode == "RGB" and image.size == (32, 32) and label == 7
        assert ds.files[-1] == f"{SHAPE_CLASSES[7]}/{sizes[split] - 1:06d}.png"
        record = json.loads(json.dumps(ds.describe()))
        assert record["size"] == len(ds) and record["seed"] == 0 and record["image_size"] == 32
    ds = build_dataset("synthetic-shapes", tiny_root, "val", transform=np.asarray, **TINY)
    assert ds[0][0].shape == (32, 32, 3)
    ds.verify(progress=False)


def test_silhouette_style_draws_the_same_objects_white_on_black(tiny_root, tmp_path):
    sil = prepare_synthetic_shapes(tmp_path / "sil", seed=0, style="silhouette", **TINY)
    colour, white = tree_digest(tiny_root), tree_digest(sil)
    for name in (n for n in colour if n.startswith(("labels/", "annotations/"))):
        if name.startswith("labels/"):
            assert white[name] == colour[name], name
    for split in SPLITS:
        a, b = (
            json.loads((r / "annotations" / f"instances_{split}.json").read_text())
            for r in (tiny_root, sil)
        )
        assert a["annotations"] == b["annotations"] and a["images"] == b["images"]
    for image in sorted(sil.glob("train/*/*.png")):
        labels = np.asarray(Image.open(sil / "labels" / image.relative_to(sil)))
        pixels = np.asarray(Image.open(image))
        assert np.array_equal(pixels, np.repeat((labels[..., None] > 0) * np.uint8(255), 3, 2))
    with pytest.raises(DatasetError, match="style 'neon'"):
        prepare_synthetic_shapes(tmp_path / "bad", style="neon", **TINY)


@pytest.mark.parametrize("split", SPLITS)
def test_coco_masks_boxes_and_label_maps_agree(tiny_root, split):
    coco = COCO(str(tiny_root / "annotations" / f"instances_{split}.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        image = Image.open(tiny_root / info["file_name"])
        labels = Image.open(tiny_root / "labels" / info["file_name"])
        assert labels.mode == "L" and labels.size == image.size == (info["width"], info["height"])
        labels = np.asarray(labels)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        main = max(anns, key=lambda a: a["area"])
        assert SHAPE_CLASSES[main["category_id"] - 1] == Path(info["file_name"]).parent.name
        assert main["area"] >= 0.04 * labels.size
        assert set(np.unique(labels)) == {0} | {a["category_id"] for a in anns}
        for ann in anns:
            mask = coco.annToMask(ann).astype(bool)
            drawn = labels == ann["category_id"]
            assert (mask & drawn).sum() / (mask | drawn).sum() > 0.95
            assert ann["area"] == pytest.approx(mask.sum(), abs=1) and ann["iscrowd"] == 0
            ys, xs = np.nonzero(mask)
            extent = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert np.allclose(ann["bbox"], extent, atol=1.5)


# --- imagefolder --------------------------------------------------------------------------------


def write_image(path: Path, colour=(200, 10, 10), size=(5, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagefolder_reads_sorted_classes_and_files_with_any_case_extension(tmp_path):
    for split in SPLITS:
        write_image(tmp_path / split / "dog" / "b.JPG")
        write_image(tmp_path / split / "dog" / "a.png", (1, 2, 3))
        write_image(tmp_path / split / "cat" / "c.webp")
        (tmp_path / split / "cat" / "notes.txt").write_text("not an image")
    ds = build_dataset("imagefolder", tmp_path, "val")
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 1, 1]
    assert ds.files == ["cat/c.webp", "dog/a.png", "dog/b.JPG"]
    assert ds[1][0].getpixel((0, 0)) == (1, 2, 3)


def test_imagefolder_names_the_missing_root_or_split(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nowhere"))):
        build_dataset("imagefolder", tmp_path / "nowhere", "train")
    write_image(tmp_path / "train" / "cat" / "a.png")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "test"))):
        build_dataset("imagefolder", tmp_path, "test")


def test_imagefolder_names_an_empty_class_directory(tmp_path):
    write_image(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "train" / "dog"))):
        build_dataset("imagefolder", tmp_path, "train")


def test_imagefolder_names_the_split_and_class_that_differ(tmp_path):
    write_image(tmp_path / "train" / "cat" / "a.png")
    write_image(tmp_path / "val" / "cat" / "a.png")
    write_image(tmp_path / "val" / "dog" / "a.png")
    with pytest.raises(DatasetError, match="'dog' is in 'val'"):
        build_dataset("imagefolder", tmp_path, "train")


def test_imagefolder_names_a_corrupt_image_on_load_and_on_verify(tmp_path):
    write_image(tmp_path / "train" / "cat" / "a.png")
    bad = tmp_path / "train" / "cat" / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = build_dataset("imagefolder", tmp_path, "train")
    ds[0]
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        ds[1]
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        ds.verify(progress=False)


# --- cifar --------------------------------------------------------------------------------------


def cifar_batch(rng, per_class: int, classes: int) -> tuple[np.ndarray, list[int]]:
    labels = [k for k in range(classes) for _ in range(per_class)]
    return rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), labels


class Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official files: every str as BINSTRING (which
    Python 3 must decode), numpy's globals under numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_binstring(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_binstring

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__name__}\n".encode())
        self.memoize(obj)


DUMPS = {
    "python2": lambda obj, f: Python2Pickler(f, protocol=2).dump(obj),
    "protocol2": lambda obj, f: pickle.dump(obj, f, protocol=2),
    "highest": lambda obj, f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL),
}


def write_cifar10(directory: Path, dump=DUMPS["highest"]) -> dict[str, tuple[np.ndarray, list]]:
    """Five train batches of 20 and a test batch of 10, keyed like the official files."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(rng, 2, 10) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(rng, 1, 10)
    for name, (data, labels) in batches.items():
        with open(directory / name, "wb") as f:
            dump(
                {
                    b"batch_label": name.encode(),
                    b"data": data,
                    b"labels": labels,
                    b"filenames": [b"x.png"] * len(labels),
                },
                f,
            )
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    with open(directory / "batches.meta", "wb") as f:
        dump({b"label_names": names, b"num_vis": 3072}, f)
    return batches


@pytest.mark.parametrize("writer", sorted(DUMPS))
def test_cifar10_loads_the_pickle_layout_and_carves_a_stratified_val(tmp_path, writer):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py", DUMPS[writer])
    test = build_dataset("cifar10", tmp_path, "test")
    data, labels = batches["test_batch"]
    assert test.classes[1] == "automobile" and test.targets == labels
    image, label = test[3]
    # a row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major
    y, x = 5, 7
    assert image.size == (32, 32) and label == labels[3]
    assert image.getpixel((x, y)) == tuple(int(data[3, c * 1024 + y * 32 + x]) for c in range(3))
    train = build_dataset("cifar10", tmp_path / "cifar-10-batches-py", "train")
    val = build_dataset("cifar10", tmp_path, "val")
    assert Counter(val.targets) == {k: 1 for k in range(10)}
    assert Counter(train.targets) == {k: 9 for k in range(10)}
    every = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])

    def rows(ds):
        return Counter(np.asarray(ds[i][0]).transpose(2, 0, 1).tobytes() for i in range(len(ds)))

    assert rows(train) + rows(val) == Counter(row.tobytes() for row in every)
    assert build_dataset("cifar10", tmp_path, "val").targets == val.targets
    assert val.describe()["val_fraction"] == 0.1


def test_cifar100_uses_fine_labels(tmp_path):
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    rng = np.random.default_rng(1)
    for name, per_class in (("train", 10), ("test", 1)):
        data, labels = cifar_batch(rng, per_class, 100)
        with open(directory / name, "wb") as f:
            pickle.dump(
                {b"data": data, b"fine_labels": labels, b"coarse_labels": [k // 5 for k in labels]},
                f,
            )
    with open(directory / "meta", "wb") as f:
        pickle.dump(
            {
                b"fine_label_names": [f"c{k}".encode() for k in range(100)],
                b"coarse_label_names": [b"x"] * 20,
            },
            f,
        )
    ds = build_dataset("cifar100", tmp_path, "val")
    assert ds.num_classes == 100 and ds.classes[42] == "c42"
    assert Counter(ds.targets) == {k: 1 for k in range(100)}


class RunsAShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar_pickle_that_calls_os_system_is_refused_unexecuted(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    marker = tmp_path / "pwned"
    with open(directory / "test_batch", "wb") as f:
        pickle.dump({b"data": RunsAShellCommand(f"echo pwned > {marker}"), b"labels": []}, f)
    with pytest.raises(DatasetError, match="system") as err:
        build_dataset("cifar10", tmp_path, "test")
    assert str(directory / "test_batch") in str(err.value)
    assert not marker.exists()


def test_cifar_corrupt_or_missing_files_are_named(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    (directory / "data_batch_3").write_bytes(b"\x80\x04 garbage")
    with pytest.raises(DatasetError, match=re.escape(str(directory / "data_batch_3"))):
        build_dataset("cifar10", tmp_path, "train")
    (directory / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=re.escape(str(directory / "data_batch_3"))):
        build_dataset("cifar10", tmp_path, "val")
    with pytest.raises(DatasetError, match="batches.meta"):
        build_dataset("cifar10", tmp_path / "elsewhere", "test")


# --- bundled real digits ------------------------------------------------------------------------


@pytest.mark.parametrize("name, total, side", [("digits", 1797, 8), ("mnist-subset", 5000, 28)])
def test_bundled_digits_split_60_20_20_stratified_disjoint_and_complete(name, total, side):
    np.random.seed(123)  # the split must not depend on global seeding
    splits = {s: build_dataset(name, None, s) for s in SPLITS}
    assert sum(len(ds) for ds in splits.values()) == total
    image, _ = splits["train"][0]
    assert image.mode == "RGB" and image.size == (side, side)
    pixels = np.asarray(image)
    assert (pixels == pixels[..., :1]).all()  # grey: three identical channels
    counts = {s: Counter(ds.targets) for s, ds in splits.items()}
    per_class = counts["train"] + counts["val"] + counts["test"]
    assert sorted(per_class) == list(range(10))
    for split, share in zip(SPLITS, (0.6, 0.2, 0.2)):
        assert all(abs(counts[split][k] - share * n) <= 1 for k, n in per_class.items())
    # the three splits together hold every source image exactly once (as a multiset)
    from sslbench.data.bundled import digits_arrays, mnist_arrays

    source, _ = (digits_arrays if name == "digits" else mnist_arrays)()
    held = Counter(
        np.asarray(ds[i][0])[..., 0].tobytes() for ds in splits.values() for i in range(len(ds))
    )
    assert held == Counter(img.tobytes() for img in source)
    assert build_dataset(name, "/ignored", "val").targets == splits["val"].targets


def test_stratified_split_partitions_the_indices():
    targets = np.repeat(np.arange(4), [7, 10, 3, 1])
    parts = stratified_split(targets, (0.6, 0.2, 0.2), seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(targets)))
    assert [len(p) for p in stratified_split(targets, (0.5, 0.5), seed=0)] == [11, 10]


# --- the registry -------------------------------------------------------------------------------


def test_registered_names_and_errors_for_bad_names_splits_and_options(tmp_path):
    assert DATASETS.names() == sorted(
        [
            "synthetic-shapes",
            "imagefolder",
            "cifar10",
            "cifar100",
            "digits",
            "mnist-subset",
            "shards",
        ]
    )
    with pytest.raises(DatasetError, match="did you mean 'cifar10'"):
        build_dataset("cifar-10", tmp_path, "train")
    with pytest.raises(DatasetError, match="'valid'"):
        build_dataset("digits", None, "valid")
    with pytest.raises(DatasetError, match="val_fraction"):
        build_dataset("cifar10", tmp_path, "train", val_frac=0.2)


def test_default_data_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SSLBENCH_DATA", raising=False)
    assert default_data_root() == Path("data")
    monkeypatch.setenv("SSLBENCH_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "imagefolder"))):
        build_dataset("imagefolder", None, "train")
