"""`make bench-peers`: the pipeline's variants and TRL, one run per seed each, then one evaluator for
all. Method: bench/peers/__init__.py."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.peers import __doc__ as METHOD
from bench.peers.evaluation import apply_accuracies, eval_set, evaluate, evaluate_main
from bench.peers.measure import ROOT, RunFailed, say
from bench.peers.pipeline import STUDENT, pipeline_run
from bench.peers.report import render_markdown, result_rows, summarise
from bench.peers.trl import trl_main, trl_run
from bench.record import write_results

TEACHER = ROOT / "assets" / "tiny" / "teacher"
VOCABULARY = json.loads((STUDENT / "config.json").read_text())["vocab_size"]
# `default` is configs/tiny.yaml as it is (the card's k1 loss, the HF engine); `best` is the fastest
# learner the pipeline offers here: reverse KL over the student's top-16 tokens (a direct loss: no lp_old
# pass); `exact` is the same loss over the whole tiny vocabulary (k = 332), i.e. TRL's objective, which
# stores 332 log-probs per token in both shards (at Qwen3's 151,669 ids only a top-k is practical).
# They sample with the HF engine: on this CPU vLLM's engine start costs 30-60 s and it samples ~1.3x
# faster, which 20 short iterations do not pay back; on a GPU add generate.engine=vllm (`--variant ...`).
# `vopd` and `poweropd` are the card's k1 with a value baseline over the student's top-16 and with a
# bounded reward (docs/loss.md): one teacher log-prob per token (vopd: 16), as k1. `poweropd-rollout`
# also takes lp_old from the sampler (train.old_logprobs=rollout): the HF sampler is the trainer's fp32
# model, so this saves the lp_old forward and changes nothing else (tests/test_train.py).
VARIANTS = {"default": [], "vopd": ["train.loss=vopd", "generate.student_topk=16"],
            "poweropd": ["train.loss=poweropd"],
            "poweropd-rollout": ["train.loss=poweropd", "train.old_logprobs=rollout"],
            "best": ["train.loss=reverse_kl_topk", "generate.student_topk=16"],
            "exact": ["train.loss=reverse_kl_topk", f"generate.student_topk={VOCABULARY}"]}


def warm_up() -> None:
    """Untimed: DeepSpeed's shared-memory comm op compiles on first use (cached in TORCH_EXTENSIONS_DIR)."""
    say("warm-up: DeepSpeed's CPU comm op (compiled once, then cached)")
    subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; "
                    "ShareMemCommBuilder().load()"], cwd=ROOT, check=True, capture_output=True)


def run_benchmark(args: argparse.Namespace, variants: dict[str, list[str]]) -> list[dict]:
    shutil.rmtree(args.work, ignore_errors=True)  # fresh run folders and MLflow database
    args.work.mkdir(parents=True)
    warm_up()
    runs = []
    systems = [*variants, "trl", *(["trl-vllm"] if args.trl_vllm else [])]
    for seed in range(args.seeds):  # seed by seed: an interrupted benchmark still has whole seeds
        for system in systems:
            folder = args.work / f"{system}-s{seed}"
            say(f"{system}, seed {seed}: {args.iterations} x 256 samples (load {os.getloadavg()[0]:.2f})")
            try:
                if system.startswith("trl"):
                    run = trl_run(folder, args.iterations, args.time_cap_s, args.threads, vllm=system == "trl-vllm",
                                  seed=seed)
                else:
                    run = pipeline_run(system, folder, args.iterations, args.time_cap_s,
                                       [f"threads={args.threads}", f"seed={seed}", *variants[system]])
            except RunFailed as error:
                if system != "trl-vllm":
                    raise SystemExit(str(error)) from None
                # An optional peer that cannot run here is a result (reported), not the end of the benchmark.
                say(f"{system}: failed: {error.reason}")
                log = error.log.resolve()
                runs.append({"system": system, "seed": seed, "failed": error.reason,
                             "log": str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log)})
                (args.work / "runs.json").write_text(json.dumps(runs, indent=1))
                continue
            run.update(system=system, seed=seed)
            last = run["checkpoints"][-1]
            say(f"{system}, seed {seed}: {run['wall_s']:.1f}s wall, {last['samples']} samples by "
                f"{last['seconds']:.1f}s, load {run['load_mean']:.2f}" + (" [time cap]" if run["time_capped"] else ""))
            runs.append(run)
            (args.work / "runs.json").write_text(json.dumps(runs, indent=1))
    paths = [str(TEACHER), str(STUDENT)]
    paths += [c["path"] for r in runs for c in r.get("checkpoints", [])
              if c["version"] > 0 and (c["version"] % args.eval_every == 0 or c is r["checkpoints"][-1])]
    say(f"evaluating {len(paths)} models on {args.eval_prompts} prompts (teacher, student, every "
        f"{args.eval_every}. checkpoint and the last)")
    apply_accuracies(runs, evaluate(paths, args.work, eval_set(args.work, args.eval_prompts)))
    (args.work / "runs.json").write_text(json.dumps(runs, indent=1))
    return runs


def report_again(work: Path, eval_missing: bool) -> tuple[list[dict], str]:
    runs = json.loads((work / "runs.json").read_text())
    command = json.loads((work / "command.json").read_text())["command"]
    if eval_missing:
        graded = json.loads((work / "eval.json").read_text())
        missing = [c["path"] for r in runs for c in r.get("checkpoints", []) if c["version"] > 0
                   and c["path"] not in graded]
        if missing:
            say(f"evaluating {len(missing)} more checkpoints")
            evaluate(missing, work, eval_set(work, json.loads((work / "command.json").read_text())["eval_prompts"]))
        command += "; python -m bench.peers report --eval-missing"
    apply_accuracies(runs, json.loads((work / "eval.json").read_text()))
    (work / "runs.json").write_text(json.dumps(runs, indent=1))
    return runs, command


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """NAME=KEY=VALUE,KEY=VALUE (NAME= alone: the config as it is)."""
    if not specs:
        return dict(VARIANTS)
    variants = {}
    for spec in specs:
        name, _, overrides = spec.partition("=")
        variants[name] = [o for o in overrides.split(",") if o]
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=METHOD,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20, help="iterations of 256 samples per run (%(default)s)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per system, seeds 0..N-1 (the config's `seed`: "
                        "prompts, their order and the sampling); curves are averaged over them (%(default)s)")
    parser.add_argument("--eval-prompts", type=int, default=500, help="eval prompts per model: the tiny eval split "
                        "(500), or more drawn from its generator, disjoint from training (2500: a standard error "
                        "<= 0.01) (%(default)s)")
    parser.add_argument("--time-cap-s", type=float, default=900, help="wall-time cap of one run (%(default)s)")
    parser.add_argument("--eval-every", type=int, default=2, help="evaluate checkpoints v_k with k a multiple of "
                        "this, and each run's last (%(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process, every system "
                        "(%(default)s = torch's default)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                        help=f"a pipeline variant (repeatable; default: {VARIANTS})")
    parser.add_argument("--trl-vllm", action="store_true", help="also TRL with its vLLM generation (colocate)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-peers", help="run folders (%(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md", help="report (%(default)s)")
    commands = parser.add_subparsers(dest="command")
    trl = commands.add_parser("trl", help="internal: one TRL run")
    trl.add_argument("--out", type=Path, required=True)
    trl.add_argument("--iterations", type=int, required=True)
    trl.add_argument("--launch", type=float, required=True)
    trl.add_argument("--threads", type=int, default=0)
    trl.add_argument("--vllm", action="store_true")
    trl.add_argument("--seed", type=int, default=0)
    report = commands.add_parser("report", help="write the report again from <work>/runs.json and <work>/eval.json")
    report.add_argument("--eval-missing", action="store_true", help="first evaluate the checkpoints not yet graded")
    ev = commands.add_parser("evaluate", help="internal: eval accuracy of model folders")
    ev.add_argument("--out", type=Path, required=True)
    ev.add_argument("--set", type=Path, required=True, help="the eval parquet")
    ev.add_argument("paths", nargs="+")
    args = parser.parse_args()
    if args.command == "trl":
        return trl_main(args.out, args.iterations, args.launch, args.threads, args.vllm, args.seed)
    if args.command == "evaluate":
        return evaluate_main(args.paths, args.out, args.set)
    started = time.time()
    variants = parse_variants(args.variant)
    if args.command == "report":
        runs, command = report_again(args.work, args.eval_missing)
    else:
        command = " ".join(["python -m bench.peers", *sys.argv[1:]])
        runs = run_benchmark(args, variants)
        (args.work / "command.json").write_text(json.dumps({"command": command, "eval_prompts": args.eval_prompts}))
    eval_prompts = json.loads((args.work / "command.json").read_text()).get("eval_prompts", 500)
    teacher = json.loads((args.work / "eval.json").read_text())[str(TEACHER)]
    summary = summarise(runs, teacher, next(iter(variants)), eval_prompts)
    args.out.write_text(render_markdown(runs, summary, command.strip(), args.iterations))
    written = write_results("peers", "make bench-peers", result_rows(summary), {"seeds": summary["seeds"]})
    say(f"wrote {args.out} and {written} ({(time.time() - started) / 60:.1f} min); " + "; ".join(
        f"{pair} {figures['speedup']:.2f}x" for pair, figures in summary["speedups"].items()))


if __name__ == "__main__":
    main()
