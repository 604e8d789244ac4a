"""What the three benchmark scripts share: model names, the children's environment, argument
lists, the printed table and the ``--json`` report. Imported as ``common`` (the scripts run as
``python bench/<script>.py``, so ``bench/`` is on ``sys.path``)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"smollm2": "packaged:smollm2-135m-instruct", "tiny-random": "tiny-random"}


def split_choices(parser, text: str, allowed, what: str) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]``; an entry not in ``allowed`` is a parser error naming them."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        parser.error(f"unknown {what}(s) {bad}; allowed: {', '.join(allowed)}")
    return items


def child_env(threads: int, *, glibc_malloc: bool = False, **extra: str) -> dict[str, str]:
    """Environment of a measured child (every child alike, ours and the peers'): ``threads``
    OpenMP/MKL threads, no tokenizer threads, and glibc keeping freed memory in its heap as the
    library's launched training processes do (``vcb_lib.launch.MALLOC_ENV``) unless ``glibc_malloc``
    or the environment sets those variables."""
    from vcb_lib.launch import MALLOC_ENV

    return ({} if glibc_malloc else MALLOC_ENV) | os.environ | {
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", **extra}


def spawn_child(script: str, argv: list[str], cell: str, env: dict[str, str], *extra: str) -> dict | None:
    """Run ``script`` again in a fresh process as the measured child ``--child cell`` (its own peak
    RSS) and return the JSON it writes to ``--out-file``; on failure print the end of its stderr and
    return None. ``argv``: the parent's arguments (``without_json``); ``extra``: more of them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cell.json"
        cmd = [sys.executable, script, *argv, *extra, "--child", cell, "--out-file", str(out)]
        proc = subprocess.run(cmd, env=env, cwd=Path(script).resolve().parents[1], capture_output=True, text=True)
        if proc.returncode:
            print(f"{cell}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            return None
        return json.loads(out.read_text())


def without_json(argv: list[str]) -> list[str]:
    """The command line to hand a child: the parent's, minus ``--json PATH`` / ``--json=PATH``."""
    return [a for i, a in enumerate(argv) if a != "--json" and not a.startswith("--json=")
            and not (i and argv[i - 1] == "--json")]


def print_cells(cols: list[str], cells: list[list[str]]) -> None:
    """Right-aligned columns under their names."""
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for x in cells:
        print("  ".join(v.rjust(w) for v, w in zip(x, widths)))


def write_report(args, internal: tuple[str, ...], **fields) -> dict:
    """The run's report (its public arguments, ``fields``, date, machine), also written to
    ``args.json`` when given."""
    report = {"args": {k: v for k, v in vars(args).items() if k not in internal}, **fields,
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()} {os.cpu_count()} cores"}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report
