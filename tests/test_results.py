"""The result record contract: round trip, validation naming file and field, concurrent writers."""

import json
import multiprocessing
from dataclasses import replace

import pytest

from sslbench.results import (
    SCHEMA_VERSION,
    BackboneIdentity,
    DatasetInfo,
    RecordError,
    ResultRecord,
    load_records,
    protocol_id,
    read_record,
    write_record,
)

SHA = "ab" * 32


def make_record(**changes) -> ResultRecord:
    record = ResultRecord(
        task="knn",
        metrics={"top1": 61.5, "top5": 90.0},
        backbone=BackboneIdentity(SHA, "simsiam", "ss", "resnet18"),
        protocol={"data": {"name": "synthetic-shapes"}, "knn": {"k": [10, 20]}},
        dataset=DatasetInfo(
            "synthetic-shapes", 8, {"train": 512, "val": 64, "test": 192}, {"root": "data"}
        ),
        seed=0,
        wall_time_s=1.5,
        peak_memory_mb={"cpu_rss": 800.0, "cuda_max_allocated": None},
        device="cpu",
        versions={
            "python": "3.11",
            "torch": "2",
            "torchvision": "0",
            "faiss": None,
            "sslbench": "0.1.0",
        },
    )
    return replace(record, **changes)


def test_round_trip(tmp_path):
    record = make_record()
    path = write_record(tmp_path, record)
    assert path.name == f"knn-{SHA[:12]}-{record.protocol_id}-seed0.json"
    assert read_record(path) == record
    assert record.schema_version == SCHEMA_VERSION and record.created


def test_protocol_id_is_order_independent_and_sensitive_to_values():
    a = protocol_id({"k": [10, 20], "index": "flat"})
    assert a == protocol_id({"index": "flat", "k": [10, 20]})
    assert a != protocol_id({"k": [10, 200], "index": "flat"})
    assert len(a) == 12


def test_file_name_differs_by_task_protocol_seed_and_weights():
    base = make_record()
    variants = [
        make_record(task="linear"),
        make_record(seed=1),
        make_record(protocol={"knn": {"k": [200]}}),
        make_record(backbone=BackboneIdentity("cd" * 32, "simsiam", "ss", "resnet18")),
    ]
    names = {r.file_name for r in [base, *variants]}
    assert len(names) == 5


def _corrupt(obj, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        obj = obj[p]
    if value is KeyError:
        del obj[leaf]
    else:
        obj[leaf] = value


@pytest.mark.parametrize(
    "field,value",
    [
        ("metrics", KeyError),
        ("metrics", {}),
        ("metrics.top1", "61"),
        ("task", "kmeans"),
        ("backbone.weights_sha256", "abc"),
        ("backbone.method", ""),
        ("protocol_id", "000000000000"),  # protocol edited after writing
        ("seed", 1.5),
        ("wall_time_s", -1),
        ("peak_memory_mb.cpu_rss", "big"),
        ("versions.torch", KeyError),
        ("dataset.splits.train", -3),
        ("created", "yesterday"),
        ("colour", "blue"),
    ],
)
def test_malformed_record_names_file_and_field(tmp_path, field, value):
    obj = make_record().to_json()
    _corrupt(obj, field, value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(RecordError) as err:
        read_record(path)
    message = str(err.value)
    assert str(path) in message and field.split(".")[-1] in message, message


def test_newer_schema_asks_for_upgrade(tmp_path):
    obj = make_record().to_json()
    obj["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "new.json").write_text(json.dumps(obj))
    with pytest.raises(RecordError, match="upgrade sslbench"):
        read_record(tmp_path / "new.json")


def test_invalid_record_is_refused_on_write(tmp_path):
    with pytest.raises(RecordError, match="metrics.top1"):
        write_record(tmp_path, make_record(metrics={"top1": float("nan")}))
    assert list(tmp_path.iterdir()) == []


def test_load_records_reports_bad_files_and_keeps_the_rest(tmp_path):
    good = write_record(tmp_path / "runs", make_record())
    (tmp_path / "truncated.json").write_text('{"task": "knn", ')
    (tmp_path / "list.json").write_text("[]")
    hidden = tmp_path / ".feature_cache"
    hidden.mkdir()
    (hidden / "junk.json").write_text("not a record")
    records, errors = load_records(tmp_path)
    assert [r.file_name for r in records] == [good.name]
    assert sorted(p.name for p, _ in errors) == ["list.json", "truncated.json"]
    assert all(isinstance(e, RecordError) and str(p) in str(e) for p, e in errors)


def _write_many(directory, seeds, same_name):
    for seed in seeds:
        record = make_record(seed=0 if same_name else seed, metrics={"top1": float(seed)})
        write_record(directory, record)


@pytest.mark.parametrize("same_name", [False, True])
def test_two_processes_writing_into_one_directory_lose_nothing(tmp_path, same_name):
    ctx = multiprocessing.get_context("fork")
    workers = [
        ctx.Process(target=_write_many, args=(tmp_path, range(i, 200, 2), same_name))
        for i in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    records, errors = load_records(tmp_path)
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(r.file_name for r in records)
    if same_name:  # one identity: the file is always one writer's whole record
        assert len(records) == 1
    else:
        assert sorted(r.seed for r in records) == list(range(200))
