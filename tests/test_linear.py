"""Linear probes: the fast probe reaches scikit-learn's LogisticRegression; the training helpers."""

import numpy as np
import pytest
import torch
from helpers import TINY_SHAPES
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from evaluators.features import cached_features
from evaluators.linear import fast_probe, fit_logistic, standardise
from evaluators.training import Classifier, SeededAugmentation, epoch_batches, train_transform
from sslbench.backbones import build_backbone
from sslbench.data import build_dataset
from sslbench.transforms import build_eval_transform

WEIGHT_DECAYS = [1e-4, 1e-3, 1e-2, 1e-1]


@pytest.fixture(autouse=True)
def one_blas_thread():
    """scikit-learn's BLAS with 2 threads on 2 shared cores was measured 10x slower than 1."""
    with threadpool_limits(1):
        yield


def digits_pixels(split):
    ds = build_dataset("digits", None, split)
    return torch.from_numpy(ds.images.reshape(len(ds), -1)).float(), torch.tensor(ds.targets)


@pytest.fixture(scope="module")
def shapes_features(shapes_root):
    """Features of a random-init ResNet-18 on tiny synthetic-shapes (16 px for speed), cached."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", stem="small")
    transform = build_eval_transform(16)
    out = {}
    for split in ("train", "val", "test"):
        ds = build_dataset("synthetic-shapes", shapes_root, split, transform, **TINY_SHAPES)
        f = cached_features(
            backbone,
            "0" * 64,
            ds,
            cache_dir=None,
            batch_size=256,
            device=torch.device("cpu"),
            progress=False,
        )
        out[split] = (f.features, f.labels)
    return out


def sklearn_selected(train, val, test, weight_decays):
    """LogisticRegression with C = 1 / (wd * n), C chosen on val: the reference probe."""
    xs = standardise(train[0], val[0], test[0])
    n = len(train[0])
    best = None
    for wd in weight_decays:
        clf = LogisticRegression(C=1 / (wd * n), max_iter=5000, tol=1e-6)
        clf.fit(xs[0].numpy(), train[1].numpy())
        val_acc = clf.score(xs[1].numpy(), val[1].numpy())
        if best is None or val_acc > best[0]:
            best = (val_acc, 100 * clf.score(xs[2].numpy(), test[1].numpy()))
    return best[1]


def test_fast_probe_matches_sklearn_on_digits_pixels():
    train, val, test = (digits_pixels(s) for s in ("train", "val", "test"))
    metrics, details = fast_probe(
        train, val, test, 10, lrs=[1.0], weight_decays=WEIGHT_DECAYS, max_iter=1000, progress=False
    )
    reference = sklearn_selected(train, val, test, WEIGHT_DECAYS)
    print(f"digits: fast probe {metrics['top1']:.2f}, sklearn {reference:.2f}")
    assert abs(metrics["top1"] - reference) <= 1.0
    assert metrics["top1"] > 90 and len(details["val_grid"]) == len(WEIGHT_DECAYS)


def test_fast_probe_matches_sklearn_on_shapes_features(shapes_features):
    f = shapes_features
    metrics, _ = fast_probe(
        f["train"],
        f["val"],
        f["test"],
        8,
        lrs=[1.0],
        weight_decays=WEIGHT_DECAYS,
        max_iter=1000,
        progress=False,
    )
    reference = sklearn_selected(f["train"], f["val"], f["test"], WEIGHT_DECAYS)
    print(f"shapes (random backbone): fast probe {metrics['top1']:.2f}, sklearn {reference:.2f}")
    assert abs(metrics["top1"] - reference) <= 1.0


def test_same_objective_as_sklearn():
    """At one weight decay the L-BFGS solution is sklearn's: same predictions on test."""
    (x, y), (xt, _) = digits_pixels("train"), digits_pixels("test")
    x, xt = standardise(x, xt)
    head = fit_logistic(x, y, 10, weight_decay=1e-2, max_iter=1000)
    clf = LogisticRegression(C=1 / (1e-2 * len(x)), max_iter=5000, tol=1e-8)
    clf.fit(x.numpy(), y.numpy())
    with torch.no_grad():
        ours = head(xt).argmax(1).numpy()
    assert np.mean(ours == clf.predict(xt.numpy())) > 0.995


def test_sgd_solver_close_to_lbfgs():
    train, val, test = (digits_pixels(s) for s in ("train", "val", "test"))
    lbfgs, _ = fast_probe(train, val, test, 10, lrs=[1.0], weight_decays=[1e-3], progress=False)
    sgd, _ = fast_probe(
        train,
        val,
        test,
        10,
        lrs=[0.1],
        weight_decays=[1e-3],
        solver="sgd",
        epochs=30,
        batch_size=64,
        progress=False,
    )
    assert abs(sgd["top1"] - lbfgs["top1"]) < 3


def test_diverging_setting_scores_zero_and_is_not_chosen():
    train, val, test = (digits_pixels(s) for s in ("train", "val", "test"))
    metrics, details = fast_probe(
        train,
        val,
        test,
        10,
        lrs=[0.1, 1e6],
        weight_decays=[1e-3],
        solver="sgd",
        epochs=2,
        batch_size=64,
        progress=False,
    )
    assert details["selected"]["lr"] == 0.1
    assert [row["val_top1"] for row in details["val_grid"]][1] == 0.0


def test_standardise_leaves_constant_features_finite():
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    test = torch.tensor([[2.0, 7.0]])
    a, b = standardise(train, test)
    assert torch.isfinite(b).all() and b[0, 1] == 2.0 and a[:, 0].mean() == 0


@pytest.mark.parametrize("size,batch", [(10, 4), (9, 4), (13, 4), (3, 8)])
def test_epoch_batches_split_global_batches_over_processes(size, batch):
    single = epoch_batches(size, batch, seed=1, epoch=2)
    assert sorted(i for b in single for i in b) == list(range(size))
    assert all(len(b) >= 2 for b in single)
    parts = [epoch_batches(size, batch, seed=1, epoch=2, rank=r, world_size=2) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    covered = {i for part in parts for b in part for i in b}
    assert covered == set(range(size))  # the padding repeats samples, it drops none
    if size % 2 == 0:
        assert [a + b for a, b in zip(*parts)] == single
    if size > 5:
        assert epoch_batches(size, batch, seed=1, epoch=3) != single


def test_frozen_classifier_keeps_backbone_in_eval_mode_without_gradients():
    backbone = build_backbone("resnet18", stem="small")
    model = Classifier(backbone, 8, frozen=True).train()
    assert not backbone.training and model.head.training
    before = backbone.bn1.running_mean.clone()
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert model.head.weight.grad is not None
    assert torch.equal(before, backbone.bn1.running_mean)


def test_seeded_augmentation_depends_on_sample_and_epoch_not_on_order(shapes_root):
    train = build_dataset("synthetic-shapes", shapes_root, "train", **TINY_SHAPES)
    data = SeededAugmentation(train, train_transform(16, 0.08), seed=3, indices=[5, 9, 40])
    forward = [data[i][0] for i in range(3)]
    torch.manual_seed(123)  # the global RNG state must not matter
    backward = [data[i][0] for i in reversed(range(3))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert data[1][1] == train.targets[9]
    assert not torch.equal(forward[0], forward[1])
    data.epoch = 1
    assert not torch.equal(data[0][0], forward[0])
