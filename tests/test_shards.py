"""Shards: the round trip from an ImageFolder, the writer's crash safety, the streamed epoch order
(splitting, seeding, resume) and shard-vs-folder equivalence in pretraining and features."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import ROOT
from omegaconf import OmegaConf
from PIL import Image

from pretrain.sampling import EpochBatchSampler, sample_seed
from pretrain.shard_loader import EpochOrder, shard_batches
from sslbench import distributed as D
from sslbench.data import DatasetError, ImageFolder, build_dataset, shard_writer
from sslbench.data import shards as shards_module
from sslbench.data.shards import INDEX_FILE, ShardDataset, sample_key
from sslbench.io import sha256_file

COUNTS = {"ant": 9, "bee": 13, "cat": 7}  # 29 images: shards of 5 leave a short last one


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny ImageFolder of PNGs and JPEGs of assorted sizes (train, and a test split)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, scale in (("train", 1), ("test", 0.5)):
        for cls, count in COUNTS.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(max(1, int(count * scale))):
                h, w = rng.integers(6, 20, 2)
                image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                image.save(root / split / cls / f"{i:03d}.{'png' if i % 3 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    shard_writer.write_shards(folder, out, shard_size=5, progress=False)
    return out


def test_round_trip_gives_the_folder_back(folder, shards):
    for split in ("train", "test"):
        source = ImageFolder(folder, split)
        index = json.loads((shards / split / INDEX_FILE).read_text())
        assert index["classes"] == source.classes == sorted(COUNTS)
        assert index["class_counts"] == [source.targets.count(c) for c in range(3)]
        assert [s["samples"] for s in index["shards"]] == [
            min(5, len(source) - lo) for lo in range(0, len(source), 5)
        ]
        for s in index["shards"]:
            assert sha256_file(shards / split / s["file"]) == s["sha256"]
        dataset = build_dataset("shards", shards, split)
        assert isinstance(dataset, ShardDataset) and dataset.targets == source.targets
        files = [source.split_dir / f for f in source.files]
        read = [item for shard in range(len(dataset.shards)) for item in dataset.read(shard)]
        assert [i for i, _ in read] == list(range(len(source)))
        assert [data for _, data in read] == [f.read_bytes() for f in files]
        for i in (0, 4, 5, 3, len(source) - 1):  # forward, to the next shard, back, the end
            assert np.array_equal(
                np.asarray(dataset.load_image(i)), np.asarray(Image.open(files[i]).convert("RGB"))
            )
        # The same samples through webdataset's own reader: keys in the folder's order.
        urls = [str(shards / split / s["file"]) for s in index["shards"]]
        samples = list(wds.WebDataset(urls, shardshuffle=False))
        assert [s["__key__"] for s in samples] == [sample_key(i) for i in range(len(source))]
        assert [int(s["cls"]) for s in samples] == source.targets
        assert [s["path.txt"].decode() for s in samples] == source.files
        assert [s[Path(f).suffix[1:]] for s, f in zip(samples, files)] == [
            f.read_bytes() for f in files
        ]


def test_an_interrupted_write_is_finished_by_running_it_again(
    folder, shards, tmp_path, monkeypatch
):
    real = shard_writer._read_image
    calls = []

    def dies_in_the_third_shard(path):
        calls.append(path)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(shard_writer, "_read_image", dies_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        shard_writer.write_shards(folder, tmp_path, 5, ["train"], progress=False)
    left = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert left == [".plan.json", "train-000000.tar", "train-000001.tar"]
    (tmp_path / "train" / ".train-000002.tar.x1y2.tmp").write_bytes(b"cut short by a kill")
    monkeypatch.setattr(shard_writer, "_read_image", real)
    shard_writer.write_shards(folder, tmp_path, 5, ["train"], progress=False)
    assert (tmp_path / "train" / INDEX_FILE).read_bytes() == (
        shards / "train" / INDEX_FILE
    ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == sorted(
        p.name for p in (shards / "train").iterdir()
    )

    with pytest.raises(DatasetError, match="shard_size: 5 there, 4 now"):
        shard_writer.write_shards(folder, tmp_path, 4, ["train"], progress=False)
    (tmp_path / "other" / "train").mkdir(parents=True)
    (tmp_path / "other" / "train" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="is not empty"):
        shard_writer.write_shards(folder, tmp_path / "other", 4, ["train"], progress=False)


def test_bad_files_are_named(folder, shards, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    (bad / "train" / "a").mkdir(parents=True)
    (bad / "train" / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DatasetError, match=str(bad / "train" / "a" / "x.png")):
        shard_writer.write_shards(bad, tmp_path / "out", 5, progress=False)

    copy = tmp_path / "copy"
    (copy / "train").mkdir(parents=True)
    for f in (shards / "train").iterdir():
        (copy / "train" / f.name).write_bytes(f.read_bytes())
    damaged = copy / "train" / "train-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[600] ^= 0xFF  # in the block of sample 5's first member: same size, other bytes
    damaged.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"shard {damaged} does not have the sha256"):
        ShardDataset(copy, "train").verify(progress=False)
    # Past ImageFolder's full-decode limit only the members are walked: a damaged header (the
    # second sample's first) reads as the end of the tar, before the samples the index lists.
    data[600] ^= 0xFF
    with tarfile.open(damaged) as tar:
        header = tar.getmember("0000000006.cls").offset
    data[header + 10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(shards_module, "FULL_DECODE_LIMIT", 0)
    with pytest.raises(DatasetError, match=f"shard {damaged} ends before sample 0000000006"):
        ShardDataset(copy, "train").verify(progress=False)
    damaged.write_bytes(bytes(data[:2048]))
    with pytest.raises(DatasetError, match=f"shard {damaged} is 2048 bytes"):
        ShardDataset(copy, "train")
    with pytest.raises(DatasetError, match="does not exist"):
        ShardDataset(copy, "val")
    ShardDataset(shards, "train").verify(progress=False)


# The epoch order, from counts alone: shards of uneven sizes, as a real index has.
SHARD_COUNTS = [7, 7, 3, 7, 7, 7, 5, 7, 1, 7]  # 58 samples


@pytest.mark.parametrize("batch,streams,buffer", [(8, 4, 6), (12, 2, 1), (16, 16, 100)])
def test_each_sample_once_per_epoch_in_a_seeded_order(batch, streams, buffer):
    order = EpochOrder(SHARD_COUNTS, batch, streams, buffer, seed=3, epoch=1)
    batches = [order.batch(j) for j in range(order.steps)]
    seen = [i for b in batches for i in b]
    assert order.steps == 58 // batch and all(len(b) == batch for b in batches)
    assert len(set(seen)) == len(seen) == order.steps * batch and set(seen) <= set(range(58))
    assert batches == [
        EpochOrder(SHARD_COUNTS, batch, streams, buffer, 3, 1).batch(j) for j in range(order.steps)
    ]
    for seed, epoch in ((3, 2), (4, 1)):
        other = EpochOrder(SHARD_COUNTS, batch, streams, buffer, seed, epoch)
        assert [other.batch(j) for j in range(order.steps)] != batches
    # A buffer holds whole shards (of the stream's piece) until it reaches `buffer` samples;
    # the stream's last one may hold fewer.
    for s in range(streams):
        buffers = list(order.buffers(s))
        assert all(sum(g.hi - g.lo for g in b.segments) >= buffer for b in buffers[:-1])
        assert all(
            len(b.segments) == 1 or sum(g.hi - g.lo for g in b.segments[:-1]) < buffer
            for b in buffers
        )


def test_one_stream_holding_the_split_is_the_folder_order():
    order = EpochOrder(SHARD_COUNTS, 8, 1, 58, seed=5, epoch=2)
    folder = [[i for i, _ in b] for b in EpochBatchSampler(58, 8, 5, 2)]
    assert [order.batch(j) for j in range(order.steps)] == folder


class _SeedOf:
    """A transform that returns the seed it is given: the test maps seeds back to indices."""

    def __call__(self, image, seed):
        return torch.tensor(seed)


def _cfg(batch: int, workers: int):
    return OmegaConf.create(
        {"optim": {"batch_size": batch}, "run": {"seed": 7}, "data": {"num_workers": workers}}
    )


def _read_epoch(dataset, batch, workers, epoch, rank=0, world=1, start=0):
    """(indices, labels) of each batch this process gets."""
    from pretrain.sampling import MultiViewDataset

    env = D.DistEnv(rank, world, rank, torch.device("cpu"))
    index_of = {sample_seed(7, epoch, i): i for i in range(len(dataset))}
    return [
        ([index_of[s] for s in seeds.tolist()], labels.tolist())
        for seeds, labels in shard_batches(
            MultiViewDataset(dataset, _SeedOf()), _cfg(batch, workers), env, epoch, start
        )
    ]


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 1), (2, 2)])
def test_processes_and_workers_split_the_shards_and_keep_the_global_batches(shards, world, workers):
    dataset = ShardDataset(shards, "train", streams=4, shuffle_buffer=6)
    order = EpochOrder([s.samples for s in dataset.shards], 8, 4, 6, seed=7, epoch=1)
    per_rank = [_read_epoch(dataset, 8, workers, 1, r, world) for r in range(world)]
    for j in range(order.steps):
        indices = [i for rank in per_rank for i in rank[j][0]]
        assert indices == order.batch(j)
        assert [y for rank in per_rank for y in rank[j][1]] == [dataset.targets[i] for i in indices]
    assert len(per_rank[0]) == order.steps == 29 // 8


def test_resume_at_a_step_reads_the_rest_and_not_the_finished_shards(shards, tmp_path):
    copy = tmp_path / "train"
    copy.mkdir()
    for f in (shards / "train").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    dataset = ShardDataset(tmp_path, "train", streams=2, shuffle_buffer=5)
    whole = _read_epoch(dataset, 4, 2, epoch=0)
    order = EpochOrder([s.samples for s in dataset.shards], 4, 2, 5, seed=7, epoch=0)
    start = 4
    # Shards every stream is done with before the step: their files can go.
    done, needed = set(), set()
    for s in range(2):
        emitted = 0
        for b in order.buffers(s):
            emitted += len(b.order)
            (done if emitted <= start * order.run else needed).update(g.shard for g in b.segments)
    finished = done - needed
    assert finished, "the test needs a step past at least one whole shard"
    for shard in finished:
        dataset.shards[shard].path.unlink()
    assert _read_epoch(dataset, 4, 2, epoch=0, start=start) == whole[start:]


def test_config_that_cannot_split_is_a_clear_error(shards):
    dataset = ShardDataset(shards, "train", streams=4)
    with pytest.raises(ValueError, match="optim.batch_size=6 must be a multiple"):
        _read_epoch(dataset, 6, 0, epoch=0)
    with pytest.raises(ValueError, match="data.num_workers=3 must divide the 4 streams"):
        _read_epoch(dataset, 8, 3, epoch=0)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        _read_epoch(dataset, 8, 1, epoch=0, world=3)
    with pytest.raises(DatasetError, match="streams must be a positive integer"):
        build_dataset("shards", shards, "train", streams=0)


def test_features_from_shards_line_up_with_the_folder(folder, shards):
    from evaluators.features import infer
    from sslbench.transforms import build_eval_transform

    transform = build_eval_transform(8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    kwargs = {"batch_size": 3, "device": torch.device("cpu"), "num_workers": 2, "progress": False}
    expected = infer(model, ImageFolder(folder, "train", transform), **kwargs)
    assert torch.equal(infer(model, ShardDataset(shards, "train", transform), **kwargs), expected)


@pytest.mark.integration
def test_pretraining_on_shards_equals_the_folder_bit_for_bit(shapes_root, tmp_path, monkeypatch):
    """One stream whose buffer holds the split reads the folder's order (pretrain/shard_loader.py),
    so the weights match exactly; with several streams, resuming mid-epoch matches an
    uninterrupted run exactly."""
    import pretrain.engine as engine
    from pretrain.config import load_pretrain_config

    shard_writer.write_shards(shapes_root, tmp_path / "shards", 100, ["train"], progress=False)
    recipe = [str(ROOT / "configs/pretrain/simsiam_synthetic_r18.yaml")]
    common = [
        "data.image_size=16",
        "data.num_workers=0",
        "train.progress=false",
        "optim.batch_size=64",
        "train.epochs=1",
        f"run.output_dir={tmp_path}",
    ]

    def weights(name: str, *overrides: str, options: dict | None = None, resume: bool = False):
        cfg = load_pretrain_config(recipe, [*common, f"run.name={name}", *overrides])
        OmegaConf.set_readonly(cfg, False)
        cfg.data.options = options  # in place of the recipe's (synthetic-shapes') options
        OmegaConf.set_readonly(cfg, True)
        run_dir = engine.pretrain(cfg, resume=resume)
        return torch.load(run_dir / "checkpoint.pt", weights_only=True)

    on_folder = weights("folder", "data.name=imagefolder", f"data.root={shapes_root}")
    on_shards = weights(
        "shards",
        "data.name=shards",
        f"data.root={tmp_path / 'shards'}",
        options={"streams": 1, "shuffle_buffer": 512},
    )
    assert on_folder["step"] == on_shards["step"] == 512 // 64
    for key, value in on_folder["method"].items():
        assert torch.equal(value, on_shards["method"][key]), key

    args = [
        "data.name=shards",
        f"data.root={tmp_path / 'shards'}",
        "train.epochs=2",
        "train.checkpoint_every=5",
    ]
    streams = {"streams": 4, "shuffle_buffer": 100}
    straight = weights("straight", *args, options=streams)
    real_step = engine.train_step

    def dies_at_step_seven(t, *rest):
        if t.step == 7:
            raise KeyboardInterrupt
        return real_step(t, *rest)

    monkeypatch.setattr(engine, "train_step", dies_at_step_seven)
    with pytest.raises(KeyboardInterrupt):
        weights("resumed", *args, options=streams)
    monkeypatch.setattr(engine, "train_step", real_step)
    resumed = weights("resumed", *args, options=streams, resume=True)  # from step 5, in epoch 0
    assert straight["step"] == resumed["step"] == 16
    for key, value in straight["method"].items():
        assert torch.equal(value, resumed["method"][key]), key
