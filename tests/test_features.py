"""Feature extraction and its cache: keyed by weights, data and transform; torchrun as one
process."""

import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TINY_SHAPES, subprocess_env
from safetensors.torch import load_file, save_file
from torch import nn

from evaluators.features import cached_features, infer, shard_bounds
from sslbench.data import build_dataset
from sslbench.transforms import build_eval_transform

CPU = torch.device("cpu")


def toy_model():
    """Conv + BatchNorm with non-trivial running statistics: batch statistics would differ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return model


def toy_data(n):
    gen = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 4, 4, generator=gen), torch.zeros(n))


def shapes(root, split, size):
    return build_dataset("synthetic-shapes", root, split, build_eval_transform(size), **TINY_SHAPES)


def test_shards_are_contiguous_and_cover_everything():
    for n, world in [(7, 2), (1, 2), (10, 3), (5, 8)]:
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_infer_uses_eval_mode_and_keeps_order():
    model, data = toy_model(), toy_data(7)
    out = infer(model.train(), data, batch_size=3, device=CPU, progress=False)
    with torch.no_grad():
        expected = model.eval()(data.tensors[0])
    torch.testing.assert_close(out, expected)


def test_cache_hit_miss_and_key(shapes_root, tmp_path):
    model = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
    test8 = shapes(shapes_root, "test", 8)
    kw = dict(cache_dir=tmp_path, batch_size=64, device=CPU, progress=False)
    first = cached_features(model, "a" * 64, test8, **kw)
    again = cached_features(model, "a" * 64, test8, **kw)
    assert not first.from_cache and again.from_cache
    assert torch.equal(first.features, again.features)
    assert torch.equal(again.labels, torch.tensor(test8.targets))
    cached_features(model, "b" * 64, test8, **kw)  # other weights
    cached_features(model, "a" * 64, shapes(shapes_root, "test", 12), **kw)  # other transform
    cached_features(model, "a" * 64, shapes(shapes_root, "val", 8), **kw)  # other split
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_cache_with_other_labels_is_refused(shapes_root, tmp_path):
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    val = shapes(shapes_root, "val", 8)
    cached_features(
        model, "a" * 64, val, cache_dir=tmp_path, batch_size=64, device=CPU, progress=False
    )
    (path,) = tmp_path.glob("*.safetensors")
    stored = load_file(str(path))
    save_file({"features": stored["features"], "labels": stored["labels"].flip(0)}, str(path))
    with pytest.raises(ValueError, match="other labels"):
        cached_features(model, "a" * 64, val, cache_dir=tmp_path, batch_size=64, device=CPU)


HARNESS = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_features import shapes, toy_data, toy_model
from evaluators.features import cached_features, infer
from sslbench import distributed as D
env = D.init_distributed("cpu")
out, shapes_root, cache = sys.argv[1], sys.argv[2], sys.argv[3]
sizes = [int(n) for n in sys.argv[4:]]
result = {{
    str(n): infer(toy_model(), toy_data(n), batch_size=2, device=env.device, progress=False)
    for n in sizes
}}
test8 = shapes(shapes_root, "test", 8)
for use in ("miss", "hit"):
    feats = cached_features(toy_model(), "a" * 64, test8, cache_dir=cache, batch_size=5,
                            device=env.device, progress=False)
    result[use] = feats.features
    result[use + "_labels"] = feats.labels
    result[use + "_from_cache"] = torch.tensor(feats.from_cache)
torch.save(result, f"{{out}}.rank{{env.rank}}")
D.shutdown()
"""


@pytest.mark.distributed
def test_two_processes_extract_what_one_does_onto_the_main_one(shapes_root, tmp_path):
    """7 samples: shards of 4 and 3 (padding dropped); 1 sample: the second shard is empty.
    Rank 0 gets the one-process features, from the extraction and from the cache; rank 1 holds
    no bank at all (None), only the labels."""
    script = tmp_path / "extract.py"
    script.write_text(HARNESS.format(tests=str(ROOT / "tests")))
    sizes = [7, 1, 8]
    out, cache = tmp_path / "out.pt", tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(out),
        str(shapes_root),
        str(cache),
        *map(str, sizes),
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    main, other = (torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1))
    for n in sizes:
        one = infer(toy_model(), toy_data(n), batch_size=2, device=CPU, progress=False)
        assert main[str(n)].shape == one.shape
        torch.testing.assert_close(main[str(n)], one)
        assert other[str(n)] is None
    test8 = shapes(shapes_root, "test", 8)
    one = infer(toy_model(), test8, batch_size=5, device=CPU, progress=False)
    labels = torch.tensor(test8.targets)
    for use in ("miss", "hit"):
        torch.testing.assert_close(main[use], one)
        assert other[use] is None
        for got in (main, other):
            assert torch.equal(got[use + "_labels"], labels)
            assert got[use + "_from_cache"].item() == (use == "hit")
