"""Loss forms on the board: the form a run was trained in, the form a published number was
measured under, and the tags that say so in a reference file.

A run's form comes from its pretraining config (`method.loss_form`, and for `unigrad` the
`method.momentum_encoder` switch, the two columns of UniGrad's table). A published column's form
comes from its reference file's tags; an untagged table is never placed beside a run. No paper
measures `exact` (sslbench's check of its closed-form gradients), so no reference is tagged so.

The stages do not import each other: LOSS_FORMS and DERIVED repeat pretrain/unified.py's
LOSS_FORMS and the methods its UNIFIED_FORMS marks `derived` (tests/test_leaderboard_pivot.py
checks that they agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LOSS_FORMS = ("original", "exact", "unigrad")
DERIVED = frozenset({"vicreg"})  # unigrad forms derived by sslbench, not given by the paper
FORM_TAG_KEYS = ("loss_form", "momentum_encoder", "setting", "methods")


@dataclass(frozen=True)
class Form:
    loss_form: str
    momentum_encoder: bool | None = None  # the unigrad columns' switch; None: the recipe's own

    @property
    def label(self) -> str:
        if self.loss_form == "unigrad":
            return "unigrad, " + ("w/" if self.momentum_encoder else "w/o") + " momentum encoder"
        return {"original": "original loss", "exact": "exact gradient"}[self.loss_form]

    @property
    def order(self) -> tuple[int, bool]:
        return LOSS_FORMS.index(self.loss_form), bool(self.momentum_encoder)


def form_of(config: dict[str, Any]) -> Form:
    """The form of a run, from its pretraining config (`original` where it names none)."""
    method = config.get("method") or {}
    loss_form = method.get("loss_form", "original")
    if loss_form == "unigrad":
        return Form(loss_form, bool(method.get("momentum_encoder")))
    return Form(loss_form)


Check = Callable[[bool, str, str], None]  # (ok, key, problem) -> raise naming the key


def form_tags(
    table: dict[str, Any], columns: int, check: Check
) -> tuple[tuple[Form, ...], tuple[str, ...], tuple[tuple[str, str], ...]]:
    """A reference table's tags: the form and setting of each column (`loss_form` and `setting`:
    one value for every column or a list of one per column; `momentum_encoder`: a list, true or
    false under `unigrad`, null elsewhere) and `methods`, its row names as `method.name`s.
    Empty tuples for an untagged table."""
    if not any(key in table for key in FORM_TAG_KEYS):
        return (), (), ()

    def per_column(key: str, kind: type) -> list:
        value = table.get(key)
        values = value if isinstance(value, list) else [value] * columns
        check(
            len(values) == columns and all(isinstance(v, kind) for v in values),
            key,
            f"expected a {kind.__name__} or a list of {columns}",
        )
        return values

    loss_forms = per_column("loss_form", str)
    for form in loss_forms:
        check(
            form in LOSS_FORMS and form != "exact",
            "loss_form",
            f"{form!r}: expected 'original' or 'unigrad' ('exact' is no published form)",
        )
    switches = table.get("momentum_encoder", [None] * columns)
    check(
        isinstance(switches, list) and len(switches) == columns,
        "momentum_encoder",
        f"expected a list of {columns}",
    )
    for form, switch in zip(loss_forms, switches):
        check(
            isinstance(switch, bool) if form == "unigrad" else switch is None,
            "momentum_encoder",
            "expected true or false under unigrad, null elsewhere",
        )
    settings = per_column("setting", str)
    methods = table.get("methods", {})
    check(
        isinstance(methods, dict)
        and set(methods) <= set(table["rows"])
        and all(isinstance(v, str) for v in methods.values()),
        "methods",
        "expected a mapping of the table's row names to method names",
    )
    forms = tuple(Form(f, s) for f, s in zip(loss_forms, switches))
    return forms, tuple(settings), tuple(methods.items())
