"""benchmarks/unigrad_form_sweep.py: the smoke tier's learning check over settings and seeds."""

import importlib.util
import json
import math
import re

from helpers import ROOT, run_benchmark


def _sweep_module():
    spec = importlib.util.spec_from_file_location(
        "unigrad_form_sweep", ROOT / "benchmarks" / "unigrad_form_sweep.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rho_goes_to_each_form_s_own_field_and_is_dropped_where_there_is_no_F():
    overrides_for = _sweep_module().overrides_for
    setting = ["optim.base_lr=0.1", "rho=0.9"]
    assert overrides_for("unigrad", setting) == ["optim.base_lr=0.1", "method.rho=0.9"]
    assert overrides_for("byol", setting) == ["optim.base_lr=0.1", "method.unigrad.rho=0.9"]
    assert overrides_for("simclr", setting) == ["optim.base_lr=0.1"]


def test_two_seeds_of_one_form_print_their_runs_and_the_pooled_sign_test():
    out = run_benchmark(
        "unigrad_form_sweep.py",
        "--setting",
        "tiny=train.epochs=1 rho=0.9",
        "--methods",
        "unigrad",
        "--momentum",
        "off",
        "--seeds",
        "0",
        "1",
        "--workers",
        "1",
    )
    runs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["method"], r["momentum_encoder"], r["seed"]) for r in runs] == [
        ("unigrad", False, 0),
        ("unigrad", False, 1),
    ]
    for r in runs:  # z is McNemar's statistic of the run's own discordant pairs
        assert r["z"] == (r["b"] - r["c"]) / math.sqrt(r["b"] + r["c"])
    b, c = sum(r["b"] for r in runs), sum(r["c"] for r in runs)
    row = re.search(r"^\| tiny \| unigrad \| w/o \| (\S+) (\S+) \| (\S+) \|", out, re.M)
    assert row and float(row.group(3)) == round((b - c) / math.sqrt(b + c), 2)
