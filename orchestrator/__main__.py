"""Orchestrator command line.

    python -m orchestrator iterate --run runs/tiny --config configs/tiny.yaml -n 3 [-o train.lr=1e-3] [--force]
    python -m orchestrator inspect --run runs/tiny [--iter 3] [--row 0]
    python -m orchestrator report  --run runs/tiny            # runs/tiny/report.png, logged to MLflow
    python -m orchestrator compare --runs tiny,lr-test [--root runs]
    python -m orchestrator eval    --run runs/tiny [--ckpt 3] [--k 4]   # avg@k on the eval sets, logged to MLflow
    python -m orchestrator check   --run runs/tiny                       # verify the run's invariants
    python -m orchestrator workers --scheduler tcp://head:8786 --gpus 0,1,2,3 [--first-rank 0] [--roles ...]

Errors print one line, `error: <what> (fix: <how>)`, and exit with a non-zero code.
"""
from __future__ import annotations

import argparse
import socket
from pathlib import Path

from common.config import load_config
from common.errors import ConfigError, StageFailed, UserError
from common.run import fail, quiet_environment


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text)

    it = command("iterate", "run N more iterations of generate -> score -> train")
    it.add_argument("--run", type=Path, required=True, help="run folder, e.g. runs/tiny")
    it.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"), help="YAML config (default: %(default)s)")
    it.add_argument("-n", "--iterations", type=int, default=1, help="iterations to add (default: %(default)s)")
    it.add_argument("-o", "--override", action="append", default=[], help="key.sub=value (repeatable)")
    it.add_argument("--force", action="store_true", help="continue an existing run under a changed config")
    ins = command("inspect", "summarise an iteration's shards; show one response token by token")
    ins.add_argument("--run", type=Path, required=True, help="run folder, e.g. runs/tiny")
    ins.add_argument("--iter", type=int, default=None, dest="iteration", help="default: the latest scored one")
    ins.add_argument("--row", type=int, default=None, help="show one response token by token")
    rep = command("report", "plot a run's curves to <run>/report.png and log it to MLflow")
    rep.add_argument("--run", type=Path, required=True, help="run folder, e.g. runs/tiny")
    rep.add_argument("--out", type=Path, default=None, help="PNG path (default: <run>/report.png)")
    rep.add_argument("--no-teacher", action="store_true", help="skip the teacher's eval accuracy reference line")
    rep.add_argument("--table", action="store_true", help="print the learning curve as a Markdown table instead "
                     "(from the stage manifests; no PNG, no MLflow)")
    com = command("compare", "table of key params and final metrics of two or more runs")
    com.add_argument("--runs", required=True, help="comma-separated run names, e.g. tiny,lr-test")
    com.add_argument("--root", type=Path, default=Path("runs"), help="folder holding the runs (default: %(default)s)")
    ev = command("eval", "avg@k of a checkpoint on the eval sets, logged to the run's MLflow")
    ev.add_argument("--run", type=Path, required=True, help="run folder, e.g. runs/tiny")
    ev.add_argument("--ckpt", type=int, default=None, help="checkpoint version (default: the latest)")
    ev.add_argument("--k", type=int, default=None, help="samples per prompt (default: eval.k)")
    ch = command("check", "verify a run's invariants: checksums, rows, policy versions, MLflow points")
    ch.add_argument("--run", type=Path, required=True, help="run folder, e.g. runs/tiny")
    wk = command("workers", "start this machine's resident workers, one per GPU (or --workers N on a CPU), joined "
                 "to a Dask scheduler; a run uses them through cluster.address. Start it from the repository root")
    wk.add_argument("--scheduler", required=True, help="the scheduler's address, e.g. tcp://head:8786")
    where = wk.add_mutually_exclusive_group()
    where.add_argument("--gpus", default=None, help="GPU ids, one worker pinned to each, e.g. 0,1,2,3 "
                       "(default: every visible GPU)")
    where.add_argument("--workers", type=int, default=None, help="CPU workers (a machine without GPUs)")
    wk.add_argument("--first-rank", type=int, default=0, help="training rank of this machine's first worker: the "
                    "ranks of the machines before it (default: %(default)s)")
    wk.add_argument("--roles", default="generate,score,train", help="roles of these workers, a subset of "
                    "generate,score,train (default: %(default)s), e.g. score for teacher-only GPUs")
    return top


def main() -> None:
    args = parser().parse_args()
    try:
        if args.command == "iterate":
            run_iterate(args)
        elif args.command == "inspect":
            from common.libraries import quiet_libraries
            from orchestrator.inspect import inspect

            quiet_libraries()
            inspect(args.run, args.iteration, args.row)
        elif args.command == "eval":
            from orchestrator.loop import evaluate_checkpoint_now

            quiet_environment()  # the eval runs in a process of its own, which quiets its libraries
            try:
                evaluate_checkpoint_now(args.run, args.ckpt, args.k)
            except StageFailed as error:
                fail(str(error), code=1)
        elif args.command == "check":
            from orchestrator.checks import check_run

            finished, problems = check_run(args.run)
            for problem in problems:
                print(f"problem: {problem}")
            print(f"{args.run}: {finished} finished iteration(s), {len(problems)} problem(s)")
            raise SystemExit(1 if problems else 0)
        elif args.command == "workers":
            run_workers(args)
        elif args.command == "report":
            from orchestrator.report import learning_table, report

            if args.table:
                print(learning_table(args.run))
            else:
                print(f"report: {report(args.run, args.out, teacher=not args.no_teacher)} (logged to MLflow)")
        else:
            from orchestrator.compare import compare

            compare(args.runs, args.root)
    except ConfigError as error:
        fail(str(error))
    except UserError as error:
        fail(str(error))


def run_iterate(args: argparse.Namespace) -> None:
    from orchestrator.loop import iterate

    if not args.config.exists():
        fail(f"config file {args.config} does not exist", fix="pass an existing file, e.g. CONFIG=configs/tiny.yaml")
    config = load_config(args.config, args.override)
    # Echo what this run is made of before anything long starts.
    print(f"config {args.config.resolve()} (hash {config.hash()})", flush=True)
    print(f"overrides: {' '.join(args.override) if args.override else 'none'}", flush=True)
    print(f"run folder {args.run} (resolved config frozen in {args.run / 'run.yaml'})", flush=True)
    quiet_environment()  # the workers and stage processes quiet their libraries themselves
    try:
        iterate(args.run, config, args.iterations, args.force)
    except StageFailed as error:
        fail(str(error), code=1)


def run_workers(args: argparse.Namespace) -> None:
    from common.devices import visible_gpus, worker_layout
    from orchestrator.cluster import serve_workers

    roles = tuple(role.strip() for role in args.roles.split(",") if role.strip())
    if args.workers is not None:
        gpus = []
    else:
        gpus = [gpu.strip() for gpu in args.gpus.split(",")] if args.gpus else visible_gpus()
        if not gpus:
            fail("no GPU visible on this machine", fix="pass --workers N for CPU workers, or --gpus 0,1,...")
    specs = worker_layout(gpus, args.workers or 0, roles, args.first_rank, prefix=socket.gethostname())
    quiet_environment()
    host = args.scheduler.split("://")[-1]
    print(f"workers: joining {host} from {Path.cwd()} (model and data paths of the run resolve from here)", flush=True)
    serve_workers(args.scheduler, specs)


if __name__ == "__main__":
    main()
