"""Every command and sub-task prints its --help (argparse formats help strings lazily, so a stray
'%' in one only fails when someone asks for help)."""

from __future__ import annotations

import pytest

from sslbench.cli import COMMANDS, main
from sslbench.tasks import tasks

INVOCATIONS = (
    [[]] + [[c] for c in COMMANDS] + [[tasks().get(t).command, t] for t in tasks().in_order()]
)


@pytest.mark.parametrize("words", INVOCATIONS, ids=lambda w: " ".join(w) or "sslbench")
def test_help_prints(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sslbench") and "%%" not in out
