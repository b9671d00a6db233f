"""Semi-supervised label subsets: exact per-class counts, determinism, split files, missing
classes."""

from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_SHAPES
from PIL import Image

from evaluators.semisup import SubsetError, balanced_subset, labelled_indices, read_split_file
from sslbench.data import SPLITS, build_dataset

SYNSETS = ("n01", "n02", "n03")


@pytest.fixture(scope="module")
def shapes_train(shapes_root):
    return build_dataset("synthetic-shapes", shapes_root, "train", **TINY_SHAPES)


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """An ImageFolder whose file names are unique across classes, as ImageNet's are."""
    root = tmp_path_factory.mktemp("imagenet-like")
    for split in SPLITS:
        for synset in SYNSETS:
            (root / split / synset).mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (4, 4)).save(root / split / synset / f"{synset}_{i}.JPEG")
    return build_dataset("imagefolder", root, "train")


@pytest.mark.parametrize("fraction,per_class", [(0.01, 1), (0.1, 6), (0.25, 16), (1.0, 64)])
def test_balanced_subset_has_exact_per_class_counts(shapes_train, fraction, per_class):
    indices = balanced_subset(shapes_train, fraction, seed=0)
    counts = np.bincount(np.asarray(shapes_train.targets)[indices], minlength=8)
    assert counts.tolist() == [per_class] * 8
    assert len(set(indices.tolist())) == len(indices)


def test_same_seed_same_files_other_seed_other_files(shapes_train):
    def files(seed):
        return [shapes_train.files[i] for i in balanced_subset(shapes_train, 0.1, seed)]

    assert files(3) == files(3)
    assert files(3) != files(4)


def test_split_file_in_simclr_format_is_honoured(imagenet_like, tmp_path):
    listed = ["n01_3.JPEG", "n02_0.JPEG", "n03/n03_4.JPEG", "", "  n01_1.JPEG  "]
    split_file = tmp_path / "1percent.txt"
    split_file.write_text("\n".join(listed) + "\n")
    indices = labelled_indices(imagenet_like, fraction=0.5, split_file=str(split_file), seed=0)
    assert [imagenet_like.files[i] for i in indices] == [
        "n01/n01_1.JPEG",
        "n01/n01_3.JPEG",
        "n02/n02_0.JPEG",
        "n03/n03_4.JPEG",
    ]


def test_split_file_missing_a_class_names_it(imagenet_like, tmp_path):
    split_file = tmp_path / "subset.txt"
    split_file.write_text("n01_0.JPEG\nn03_2.JPEG\n")
    with pytest.raises(SubsetError, match="no labelled sample of class 'n02'"):
        read_split_file(split_file, imagenet_like)


@pytest.mark.parametrize(
    "text,match",
    [
        ("n01_0.JPEG\nn02_0.JPEG\nn03_0.JPEG\nn04_0.JPEG\n", "4: n04_0.JPEG"),
        (
            "n01_0.JPEG\nn02_0.JPEG\nn03_0.JPEG\nn01/n01_0.JPEG\n",
            ":4: 'n01/n01_0.JPEG' repeats line 1",
        ),
        ("\n\n", "lists no files"),
    ],
)
def test_bad_split_file_lines_are_named(imagenet_like, tmp_path, text, match):
    split_file = tmp_path / "subset.txt"
    split_file.write_text(text)
    with pytest.raises(SubsetError, match=match):
        read_split_file(split_file, imagenet_like)


def test_ambiguous_base_name_asks_for_the_relative_path(shapes_train, tmp_path):
    split_file = tmp_path / "subset.txt"
    split_file.write_text("000001.png\n")  # every shapes class has a 000001.png
    with pytest.raises(SubsetError, match="matches 8 files"):
        read_split_file(split_file, shapes_train)
    split_file.write_text("".join(f"{c}/000001.png\n" for c in shapes_train.classes))
    assert len(read_split_file(split_file, shapes_train)) == 8


@pytest.mark.parametrize(
    "moved,match", [(4, "class 'n01' has 1 samples"), (5, "class 'n01' has 0 samples")]
)
def test_class_short_of_samples_is_an_error_naming_it(imagenet_like, moved, match):
    dataset = build_dataset("imagefolder", Path(imagenet_like.root), "train")
    dataset.targets = [1 if t == 0 and i < moved else t for i, t in enumerate(dataset.targets)]
    with pytest.raises(SubsetError, match=match):
        balanced_subset(dataset, 0.6, seed=0)  # 3 per class asked


def test_split_file_needs_files_and_fraction_must_be_a_fraction(tmp_path):
    digits = build_dataset("digits", None, "train")
    (tmp_path / "s.txt").write_text("0.png\n")
    with pytest.raises(SubsetError, match="held in memory"):
        read_split_file(tmp_path / "s.txt", digits)
    with pytest.raises(SubsetError, match="split_file .* not found"):
        read_split_file(tmp_path / "missing.txt", digits)
    with pytest.raises(SubsetError, match=r"fraction must be in \(0, 1\]"):
        balanced_subset(digits, 0.0, seed=0)
