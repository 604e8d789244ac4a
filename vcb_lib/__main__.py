"""Command line: ``python -m vcb_lib run|sweep|list-params|export``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vcb_lib.config import ConfigError, describe, load_params
from vcb_lib.io import FolderBusy
from vcb_lib.manifest import ArtefactError
from vcb_lib.runner import NOTEBOOKS_DIR, RunnerError, StageFailed, run


def _os_error(err: OSError) -> str:
    """``Not a directory: '/x/file/run'``: the reason and the path, without the errno prefix."""
    if err.filename is None:
        return str(err)
    paths = " -> ".join(repr(str(f)) for f in (err.filename, err.filename2) if f is not None)
    return f"{err.strerror or type(err).__name__}: {paths}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vcb_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_run = sub.add_parser("run", help="execute the ordered notebooks with papermill into outputs/<run>/")
    p_run.add_argument("params", help="parameter file, e.g. params/default.yaml")
    p_run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one parameter, e.g. --set training.gamma=0.1 (repeatable)")
    p_run.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR, help="folder of NN_<name>.ipynb notebooks")
    group = p_run.add_mutually_exclusive_group()
    group.add_argument("--only", nargs="+", metavar="STAGE", help="run only these notebooks (e.g. 00_theory or theory)")
    group.add_argument("--from", dest="start", metavar="STAGE", help="run this notebook and every later one")

    p_sweep = sub.add_parser("sweep", help="run every unfinished point of a sweep file into outputs/<run>/sweeps/<sweep>/<point>/")
    p_sweep.add_argument("sweep", help="sweep file, e.g. params/sweeps/gamma.yaml")
    p_sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override one parameter of every point, under the sweep's own keys, e.g. "
                              "--set run.output_root=outputs/mine (repeatable)")

    p_export = sub.add_parser("export", help="write a run's D_t (and evaluation samples) for other trainers, with a "
                                             "dataset card, into <run>/export/<format>/")
    p_export.add_argument("run", help="run folder (e.g. outputs/default) or params file")
    p_export.add_argument("--format", dest="fmt", required=True, metavar="FORMAT",
                          help="hf (datasets DatasetDict: D_t + evaluation samples), trl-pairs (prompt/chosen/rejected "
                               "for TRL's DPOTrainer), trl-groups (prompt + its n completions and rewards)")
    p_export.add_argument("--pairs", default=None, metavar="PAIRS",
                          help="trl-pairs: all or best_worst, as the order-based losses pair (default: the run's training.pairs)")
    p_export.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/export/<format>/)")

    p_list = sub.add_parser("list-params", help="print the resolved parameters with their documentation")
    p_list.add_argument("params", help="parameter file")
    p_list.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    args = parser.parse_args(argv)
    try:
        if args.command == "list-params":
            print(describe(load_params(args.params, args.overrides)))
        elif args.command == "export":
            from vcb_lib.export import ExportError, export_run

            try:
                export_run(args.run, args.fmt, args.out, pairs=args.pairs, log=lambda m: print(m, flush=True))
            except ExportError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        elif args.command == "sweep":
            from vcb_lib.sweep import load_sweep, run_sweep, write_figure

            table = run_sweep(args.sweep, args.overrides, log=lambda m: print(m, flush=True))
            root = load_sweep(args.sweep, args.overrides).root()
            write_figure(args.sweep, args.overrides)
            print(table.drop(columns=["point"]).to_string(index=False))
            print(f"results: {root / 'results.csv'}; figure: {root / 'win_rate.png'}")
        else:
            run(args.params, args.overrides, only=args.only, start=args.start, notebooks_dir=args.notebooks,
                log=lambda m: print(m, flush=True))
    except (ConfigError, RunnerError, FolderBusy, ArtefactError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output root that is read-only, missing or a file; an unreadable params file
        print(f"error: {_os_error(err)}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
