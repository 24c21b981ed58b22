"""Orchestrator command line.

    python -m orchestrator iterate --run runs/tiny --config configs/tiny.yaml -n 3 [-o train.lr=1e-3] [--force]
    python -m orchestrator inspect --run runs/tiny [--iter 3] [--row 0]
    python -m orchestrator eval --run runs/tiny [--ckpt 3] [--k 4]
    python -m orchestrator check --run runs/tiny
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import ConfigError, load_config
from common.run import quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    it = commands.add_parser("iterate", help="run N more iterations of generate -> score -> train")
    it.add_argument("--run", type=Path, required=True)
    it.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    it.add_argument("-n", "--iterations", type=int, default=1)
    it.add_argument("-o", "--override", action="append", default=[], help="key.sub=value (repeatable)")
    it.add_argument("--force", action="store_true", help="continue an existing run under a changed config")
    ins = commands.add_parser("inspect", help="summarise an iteration's shards")
    ins.add_argument("--run", type=Path, required=True)
    ins.add_argument("--iter", type=int, default=None, dest="iteration", help="default: the latest scored one")
    ins.add_argument("--row", type=int, default=None, help="show one response token by token")
    ev = commands.add_parser("eval", help="avg@k of a checkpoint on the eval sets, logged to the run's MLflow")
    ev.add_argument("--run", type=Path, required=True)
    ev.add_argument("--ckpt", type=int, default=None, help="checkpoint version (default: the latest)")
    ev.add_argument("--k", type=int, default=None, help="samples per prompt (default: eval.k)")
    ch = commands.add_parser("check", help="verify a run's invariants (checksums, rows, versions, MLflow points)")
    ch.add_argument("--run", type=Path, required=True)
    args = parser.parse_args()
    quiet_libraries()
    try:
        if args.command == "iterate":
            from orchestrator.loop import StageFailed, iterate

            config = load_config(args.config, args.override)
            print(f"config {args.config} (hash {config.hash()})" + (f", overrides: {' '.join(args.override)}"
                                                                    if args.override else ""), flush=True)
            try:
                iterate(args.run, config, args.iterations, args.force)
            except StageFailed as error:
                print(f"error: {error}", file=sys.stderr)
                raise SystemExit(1)
        elif args.command == "check":
            from orchestrator.checks import check_run

            finished, problems = check_run(args.run)
            for problem in problems:
                print(f"problem: {problem}")
            print(f"{args.run}: {finished} finished iteration(s), {len(problems)} problem(s)")
            raise SystemExit(1 if problems else 0)
        elif args.command == "eval":
            from orchestrator.loop import StageFailed, evaluate_checkpoint_now

            try:
                evaluate_checkpoint_now(args.run, args.ckpt, args.k)
            except StageFailed as error:
                print(f"error: {error}", file=sys.stderr)
                raise SystemExit(1)
        else:
            from orchestrator.inspect import inspect

            inspect(args.run, args.iteration, args.row)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
