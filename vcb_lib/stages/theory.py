"""Stage 00 (notebook 00): Theorem 1 and what each loss converges to, on tabular toy problems
(``vcb_lib.theory.run_checks``). Pure computation, seconds: it always runs, and writes
``00_theory/checks.json``; :func:`assert_passed` fails the stage on a failed check.
"""
from __future__ import annotations

from vcb_lib import theory
from vcb_lib.config import Config
from vcb_lib.io import write_json
from vcb_lib.stages import artefacts


class TheoryCheckFailed(AssertionError):
    """A closed form and its numerical counterpart disagree beyond the stated tolerance."""


def run(cfg: Config) -> dict:
    """Every check of notebook 00; returns ``run_checks``' ``{"checks", "data"}`` after writing
    ``checks.json`` (the figures of notebook 00 draw ``data``)."""
    result = theory.run_checks(cfg.theory, cfg.run.seed)
    art = artefacts.theory_checks(cfg)
    write_json(art.path, result["checks"])
    art.seal()
    return result


def assert_passed(cfg: Config, result: dict, *, log=print) -> None:
    """Raise :class:`TheoryCheckFailed` naming the failed checks."""
    failed = [name for name, ok in result["checks"]["checks"].items() if not ok]
    path = artefacts.theory_checks(cfg).path
    log(f"all theory checks passed -> {path}" if not failed else f"FAILED: {failed} -> {path}")
    if failed:
        raise TheoryCheckFailed(f"theory checks failed: {failed}; see {path}")
