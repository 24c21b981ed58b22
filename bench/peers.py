"""This pipeline against TRL's on-policy distillation trainer on the same tiny task (issue 11).

    python -m bench.peers [--iterations 10] [--rounds 2] [--time-cap-s 540] [--eval-every 2]   (make bench-peers)
    python -m bench.peers report [--eval-missing]   # the report again (grading the checkpoints skipped first)

Method. Both systems train the tiny student (assets/tiny/student) from the tiny teacher on the same
prompts, on the same 2 cores, one run at a time, alternating: pipeline, TRL, pipeline, TRL, ...

- Pipeline: `python -m orchestrator iterate --run <dir> --config configs/tiny.yaml -n N -o eval.every=0`,
  exactly the tiny config (64 prompts x 4 samples per iteration, k1 reverse KL in policy-gradient
  form, 4 optimizer steps of 16 prompts, AdamW lr 2e-4, betas (0.9, 0.98), 8 warm-up steps, clip 1.0),
  with its in-loop evaluation off (both systems are evaluated afterwards, with one evaluator).
- TRL: `trl.DistillationTrainer` (TRL's on-policy distillation trainer; beta=1 = reverse KL over the
  full vocabulary, completions always sampled from the current student, i.e. GKD with lmbda=1), in
  one process. TRL samples one completion per prompt and generates once per optimizer step, so its
  dataset lists every prompt of the pipeline's schedule n=4 times, in the pipeline's mini-batch order
  (common.data.iteration_prompts, stages.train.batching.minibatches), and one optimizer step takes 64
  samples: the same prompts, samples and optimizer steps per iteration as the pipeline. The prompts
  are rendered by TRL's own chat-template call; the script checks that they are token for token the
  ids common.data gives the pipeline. Same seed (0), sampling (temperature 1, top_p 1, top_k 0, 64 new
  tokens), fp32, and the pipeline's optimizer and schedule passed in as objects (AdamW, lr 2e-4,
  betas (0.9, 0.98), no weight decay, linear warm-up over 8 steps then constant, grad clip 1.0).
  TRL writes the student every 4 steps (256 samples); the writing time is taken off its clock.

Evaluation. The checkpoints of every run (v_k after k x 256 samples; every --eval-every'th and the
last), the starting student and the teacher are graded afterwards, in one process, by the same
function, tiny_world.evaluate.accuracy: the 500 eval prompts, one sample each at temperature 1, 64
new tokens, seed 0, the project's verifier. The teacher's accuracy is the 100% reference; the
target is 80% of it. "The same accuracy" for the speed-up is the best mean accuracy (over the runs)
that the weaker system reached; each system's time is its mean clock at its first checkpoint there.

Clock. A run's clock starts just before its process is launched, so it includes Python start-up,
imports and model loading. Time to a checkpoint: the pipeline's train manifest `finished_at` of that
iteration; TRL's time when its step ends, minus the time spent writing earlier checkpoints.

Phases. Pipeline, from the stage manifests: generation = sampling time (response tokens), teacher
scoring = teacher forward (prompt + response tokens), training = the optimizer steps incl. the lp_old
forward (response tokens); and from the orchestrator's log each stage process's wall time, start-up
included. TRL, by timing its methods in the run: generation = `_generate_single_turn`, teacher =
the teacher backbone's forward (hooks; the teacher's LM head runs inside TRL's fused divergence
kernel and is counted as training), training = the rest of each optimizer step. Token counts use the
same definitions on both sides (padding excluded).

Peak RSS. os.wait4 on each run's process gives the largest single process of its tree (Linux folds
reaped children into ru_maxrss, as getrusage(RUSAGE_CHILDREN) does); psutil samples the whole tree's
RSS sum every 0.5 s.

Writes bench/results.md (tables, commands, versions, machine) and bench/results/peers.json (the
`make bench` summary convention); raw per-run figures go to <work>/runs.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import date
from importlib import metadata
from pathlib import Path

from bench.record import machine, write_results

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
ASSETS = ROOT / "assets" / "tiny"
TARGET_FRACTION = 0.8
SAMPLES_PER_ITERATION = 256  # 64 prompts x 4, the tiny config's generate.prompts_per_iteration x generate.n


def say(message: str) -> None:
    print(f"[bench-peers {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- running one measured process ---------------------------------------------------------

def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and all its descendants (0 if it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(command: list[str], log: Path, time_cap_s: float, env: dict | None = None,
                 launch: float | None = None) -> dict:
    """Run `command` (output to `log`) under a wall-time cap: wall and CPU time, peak RSS, machine load."""
    launch = launch or time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    peak_tree, loads, stop = [0], [], threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            peak_tree[0] = max(peak_tree[0], tree_rss_bytes(proc.pid))
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    capped = threading.Timer(time_cap_s, lambda: os.killpg(proc.pid, signal.SIGTERM))
    capped.start()
    _, status, usage = os.wait4(proc.pid, 0)  # the whole tree's CPU time; ru_maxrss: its largest process (KiB)
    proc.returncode = os.waitstatus_to_exitcode(status)
    capped.cancel()
    stop.set()
    sampler.join()
    wall = time.time() - launch
    hit_cap = wall >= time_cap_s - 1
    if proc.returncode != 0 and not hit_cap:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"error: {' '.join(command[:4])} ... failed with exit code {proc.returncode}:\n{tail}")
    return {"launch": launch, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "time_capped": hit_cap,
            "peak_rss_largest_process_mib": usage.ru_maxrss / 1024, "peak_rss_tree_mib": peak_tree[0] / 2**20,
            "load_mean": sum(loads) / len(loads) if loads else os.getloadavg()[0]}


# ---- the pipeline ---------------------------------------------------------------------------

def pipeline_command(run: Path, iterations: int, overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "orchestrator", "iterate", "--run", str(run), "--config",
               str(CONFIG.relative_to(ROOT)), "-n", str(iterations)]
    for override in ["eval.every=0", "seed=0", *overrides]:
        command += ["-o", override]
    return command


def list_tokens(paths: list[Path], *columns: str) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for path in paths:
        table = pq.read_table(path, columns=list(columns))
        total += sum(pc.sum(pc.list_value_length(table[c])).as_py() or 0 for c in columns)
    return total


PHASES = ("generate", "teacher", "train")


def totals(per_iteration: list[dict]) -> dict:
    """Sum of each phase's figures over the iterations."""
    summed: dict = {}
    for record in per_iteration:
        for phase, figures in record.items():
            for field, value in figures.items():
                summed.setdefault(phase, {}).setdefault(field, 0.0)
                summed[phase][field] += value
    return summed


def pipeline_run(run: Path, iterations: int, time_cap_s: float, overrides: list[str]) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    log = run.parent / f"{run.name}.log"
    measured = run_measured(pipeline_command(run, iterations, overrides), log, time_cap_s, {"OPD_PROGRESS": "0"})
    checkpoints = [{"version": 0, "samples": 0, "seconds": 0.0, "path": str(ASSETS / "student")}]
    # Each stage process's wall time, start-up included, from the orchestrator's per-iteration line.
    process_s = []
    for line in log.read_text().splitlines():
        if line.startswith("iteration ") and " done in " in line:
            inside = line[line.index("(generate") + 1 : line.rindex(")")]
            walls = dict(part.split() for part in inside.split(", "))
            process_s.append({stage: float(walls[name].rstrip("s"))
                              for stage, name in zip(PHASES, ("generate", "score", "train"))})
    per_iteration = []
    for iteration in range(min(iterations, len(process_s))):
        folder = run / f"iter={iteration:04d}"
        rollouts, scored, train = (json.loads((folder / stage / "_MANIFEST.json").read_text())
                                   for stage in ("rollouts", "scored", "train"))
        response_tokens = rollouts["metrics"]["generate/response_tokens"]
        score_tokens = list_tokens(sorted((folder / "scored").glob("*.parquet")), "prompt_ids", "response_ids")
        train_tokens = train["metrics"]["train/response_tokens"]
        per_iteration.append({
            "generate": {"tokens": response_tokens,
                         "seconds": response_tokens / rollouts["metrics"]["generate/tokens_per_s"]},
            "teacher": {"tokens": score_tokens, "seconds": score_tokens / scored["metrics"]["score/tokens_per_s"]},
            "train": {"tokens": train_tokens, "seconds": train_tokens / train["metrics"]["train/tokens_per_s"],
                      "setup_s": train["metrics"]["train/setup_seconds"]},
        })
        for phase in PHASES:
            per_iteration[-1][phase]["process_s"] = process_s[iteration][phase]
        checkpoints.append({"version": iteration + 1, "samples": (iteration + 1) * SAMPLES_PER_ITERATION,
                            "seconds": train["finished_at"] - measured["launch"],
                            "path": str(run / "checkpoints" / f"v{iteration + 1:04d}")})
    return {"system": "pipeline", "command": " ".join(pipeline_command(run, iterations, overrides)), "log": str(log),
            **measured, "checkpoints": checkpoints, "per_iteration": per_iteration, "phases": totals(per_iteration)}


# ---- TRL ------------------------------------------------------------------------------------

def trl_schedule(iterations: int, seed: int = 0) -> tuple[list[list[dict]], list[list[int]]]:
    """The pipeline's prompts of iterations 0..N-1 as (chat messages, common.data ids), each prompt n
    times, in the order of the pipeline's mini-batches (one TRL optimizer step = one mini-batch)."""
    import pyarrow.parquet as pq

    from common.config import load_config
    from common.data import _clean_message_text, iteration_prompts, load_prompts
    from common.modeling import load_tokenizer
    from stages.train.batching import minibatches

    config = load_config(CONFIG)
    g, t = config.generate, config.train
    tokenizer = load_tokenizer(config.model.student)
    prompts = load_prompts(ROOT / config.data.train, tokenizer, config.data.max_prompt_tokens,
                           config.data.enable_thinking).prompts
    table = pq.read_table(ROOT / config.data.train, columns=["prompt", "extra_info"]).to_pylist()
    messages = {str(row["extra_info"]["index"]): [{**m, "content": _clean_message_text(m["content"])}
                                                  for m in row["prompt"]] for row in table}
    rows_messages, rows_ids = [], []
    for iteration in range(iterations):
        chosen = iteration_prompts(prompts, iteration, g.prompts_per_iteration, seed)
        # The train stage's mini-batches: whole prompt groups, prompts shuffled by seed * 7 + iteration.
        for batch in minibatches([p.prompt_id for p in chosen], t.mini_batch_prompts, seed * 7 + iteration):
            for index in batch:
                for _ in range(g.n):
                    rows_messages.append(messages[chosen[index].prompt_id])
                    rows_ids.append(chosen[index].prompt_ids)
    return rows_messages, rows_ids


def trl_main(out: Path, iterations: int, launch: float, threads: int) -> None:
    """One TRL run (a separate process): train, write v1..vN, write <out>/timeline.json."""
    import torch

    if threads > 0:  # as the pipeline's `threads` key
        torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from common.config import load_config
    from common.modeling import load_model

    config = load_config(CONFIG)
    g, t = config.generate, config.train
    steps_per_iteration = g.prompts_per_iteration // t.mini_batch_prompts
    batch = t.mini_batch_prompts * g.n
    rows_messages, rows_ids = trl_schedule(iterations, config.seed)
    phases = {name: {"seconds": 0.0, "tokens": 0} for name in PHASES}

    class TimedDistillationTrainer(DistillationTrainer):
        """TRL's trainer, unchanged but for clocks around generation."""

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            began = time.perf_counter()
            completions = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            phases["generate"]["seconds"] += time.perf_counter() - began
            phases["generate"]["tokens"] += sum(map(len, completions))
            return completions

    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / config.model.student), padding_side="left")
    # Checks that TRL's own chat-template call gives the ids the pipeline samples from.
    seen = tokenizer.apply_chat_template(conversation=rows_messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, enable_thinking=config.data.enable_thinking)["input_ids"]
    if seen != rows_ids:
        raise SystemExit("error: TRL's rendered prompts differ from common.data's ids")
    student, teacher = load_model(ROOT / config.model.student), load_model(ROOT / config.model.teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    warmup = max(t.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # the train stage's schedule (stages/train)
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    args = DistillationConfig(
        output_dir=str(out / "trainer"), report_to="none", save_strategy="no", logging_steps=steps_per_iteration,
        use_cpu=True, bf16=False, gradient_checkpointing=False, seed=config.seed, data_seed=config.seed,
        max_steps=iterations * steps_per_iteration, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=t.lr, max_grad_norm=t.grad_clip, shuffle_dataset=False, dataloader_num_workers=0,
        beta=1.0, temperature=g.temperature, top_p=g.top_p, top_k=0, max_completion_length=g.max_response_tokens,
        chat_template_kwargs={"enable_thinking": config.data.enable_thinking}, disable_dropout=True,
    )
    trainer = TimedDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                       train_dataset=Dataset.from_list([{"prompt": m} for m in rows_messages]),
                                       processing_class=tokenizer, optimizers=(optimizer, scheduler))

    teacher_clock = {}
    backbone = trainer.teacher_model.base_model

    def teacher_started(module, inputs, kwargs):
        teacher_clock["began"] = time.perf_counter()
        phases["teacher"]["tokens"] += int(kwargs["attention_mask"].sum())

    def teacher_finished(module, inputs, kwargs, output):
        phases["teacher"]["seconds"] += time.perf_counter() - teacher_clock["began"]

    backbone.register_forward_pre_hook(teacher_started, with_kwargs=True)
    backbone.register_forward_hook(teacher_finished, with_kwargs=True)

    timeline = {"checkpoints": [], "cumulative": [], "steps": []}
    saving = {"seconds": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()
            self.before = {name: phases[name]["seconds"] for name in ("generate", "teacher")}
            if state.global_step == 0:
                timeline["setup_s"] = time.time() - launch

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step_s = time.perf_counter() - self.began
            others = sum(phases[name]["seconds"] - self.before[name] for name in ("generate", "teacher"))
            phases["train"]["seconds"] += step_s - others
            buffered = trainer._buffered_inputs[0]
            phases["train"]["tokens"] += int(buffered["completion_mask"].sum())
            timeline["steps"].append(step_s)
            if state.global_step % steps_per_iteration == 0:
                version = state.global_step // steps_per_iteration
                at = time.time() - launch - saving["seconds"]
                began = time.perf_counter()
                target = out / "checkpoints" / f"v{version:04d}"
                model.save_pretrained(target, safe_serialization=True)
                tokenizer.save_pretrained(target)
                saving["seconds"] += time.perf_counter() - began
                timeline["checkpoints"].append({"version": version, "samples": version * batch * steps_per_iteration,
                                                "seconds": at, "path": str(target)})
                timeline["cumulative"].append(json.loads(json.dumps(phases)))
                say(f"trl v{version}: {at:.1f}s, {version * batch * steps_per_iteration} samples")
                # Written at every checkpoint, so a run stopped by the time cap still has its figures.
                timeline.update(phases=phases, saving_s=saving["seconds"])
                (out / "timeline.json").write_text(json.dumps(timeline, indent=1))

    trainer.add_callback(Clock())
    trainer.train()
    timeline.update(phases=phases, saving_s=saving["seconds"], log_history=trainer.state.log_history)
    (out / "timeline.json").write_text(json.dumps(timeline, indent=1))


def trl_command(out: Path, iterations: int, launch: float, threads: int) -> list[str]:
    return [sys.executable, "-m", "bench.peers", "trl", "--out", str(out), "--iterations", str(iterations),
            "--launch", repr(launch), "--threads", str(threads)]


def trl_run(out: Path, iterations: int, time_cap_s: float, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}.log"
    # The launch time is passed down so that TRL's checkpoint times use the same clock as the pipeline's.
    launch = time.time()
    measured = run_measured(trl_command(out, iterations, launch, threads), log, time_cap_s, launch=launch)
    timeline = json.loads((out / "timeline.json").read_text()) if (out / "timeline.json").exists() else {}
    checkpoints = [{"version": 0, "samples": 0, "seconds": 0.0, "path": str(ASSETS / "student")},
                   *timeline.get("checkpoints", [])]
    # Per iteration: differences of the cumulative figures recorded at each checkpoint.
    cumulative = [{name: {"seconds": 0.0, "tokens": 0} for name in PHASES}, *timeline.get("cumulative", [])]
    per_iteration = [{name: {field: after[name][field] - before[name][field] for field in ("seconds", "tokens")}
                      for name in PHASES} for before, after in zip(cumulative, cumulative[1:])]
    return {"system": "trl", "command": " ".join(trl_command(out, iterations, launch, threads)),
            "log": str(log), **measured, "checkpoints": checkpoints, "per_iteration": per_iteration,
            "phases": totals(per_iteration),
            "setup_s": timeline.get("setup_s"), "saving_s": timeline.get("saving_s")}


# ---- evaluation (one evaluator for every checkpoint) ---------------------------------------

def evaluate_main(paths: list[str], out: Path) -> None:
    """Accuracy of each model folder with tiny_world.evaluate.accuracy; written to `out` as they come."""
    from common.run import quiet_libraries
    from tiny_world.evaluate import accuracy

    quiet_libraries()
    results = {}
    for path in paths:
        began = time.perf_counter()
        results[path] = accuracy(Path(path), ASSETS / "data" / "eval.parquet", temperature=1.0, seed=0,
                                 max_new_tokens=64)["accuracy"]
        say(f"eval {path}: {results[path]:.3f} ({time.perf_counter() - began:.1f}s)")
        out.write_text(json.dumps(results, indent=1))


def evaluate(paths: list[str], work: Path) -> dict[str, float]:
    """Accuracies of `paths` (in a child process), merged into <work>/eval.json; returns all of them."""
    out, batch = work / "eval.json", work / "eval-batch.json"
    command = [sys.executable, "-m", "bench.peers", "evaluate", "--out", str(batch), *paths]
    subprocess.run(command, cwd=ROOT, check=True)
    accuracies = {**(json.loads(out.read_text()) if out.exists() else {}), **json.loads(batch.read_text())}
    out.write_text(json.dumps(accuracies, indent=1))
    return accuracies


def apply_accuracies(runs: list[dict], accuracies: dict[str, float]) -> None:
    for run in runs:
        for checkpoint in run["checkpoints"]:
            if checkpoint["path"] in accuracies:
                checkpoint["accuracy"] = accuracies[checkpoint["path"]]


def report_again(work: Path, eval_missing: bool) -> tuple[list[dict], dict, str]:
    """`report`: the summary from <work>/runs.json, after evaluating the checkpoints not yet graded if asked."""
    runs = json.loads((work / "runs.json").read_text())
    command = json.loads((work / "command.json").read_text())["command"]
    accuracies = json.loads((work / "eval.json").read_text())
    if eval_missing:
        missing = [c["path"] for r in runs for c in r["checkpoints"]
                   if c["version"] > 0 and c["path"] not in accuracies]
        if missing:
            say(f"evaluating {len(missing)} more checkpoints with tiny_world.evaluate.accuracy")
            accuracies = evaluate(missing, work)
        command += "; python -m bench.peers report --eval-missing"
    apply_accuracies(runs, accuracies)
    (work / "runs.json").write_text(json.dumps(runs, indent=1))
    return runs, summarise(runs, accuracies[str(ASSETS / "teacher")]), command


# ---- figures ---------------------------------------------------------------------------------

def first_reaching(checkpoints: list[dict], level: float) -> dict | None:
    return next((c for c in checkpoints if c["accuracy"] >= level - 1e-9), None)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def system_curve(runs: list[dict]) -> list[dict]:
    """Per sample budget with an evaluated checkpoint: mean accuracy and mean clock over the runs that have
    one there (a run the time cap stopped earlier has fewer budgets; the table lists each run's figure)."""
    budgets = sorted({c["samples"] for r in runs for c in r["checkpoints"] if "accuracy" in c})
    curve = []
    for samples in budgets:
        points = [c for r in runs for c in r["checkpoints"] if c["samples"] == samples and "accuracy" in c]
        curve.append({"samples": samples, "accuracy": mean([p["accuracy"] for p in points]),
                      "accuracies": [p["accuracy"] for p in points], "seconds": mean([p["seconds"] for p in points]),
                      "all_seconds": [p["seconds"] for p in points]})
    return curve


def phase_rates(run: dict) -> dict:
    rates = {}
    for name, phase in run["phases"].items():
        rates[name] = phase["tokens"] / phase["seconds"] if phase.get("seconds") else None
        if phase.get("process_s"):
            rates[name + "_process"] = phase["tokens"] / phase["process_s"]
    return rates


def summarise(runs: list[dict], teacher: float) -> dict:
    target = TARGET_FRACTION * teacher
    systems = {}
    for name in ("pipeline", "trl"):
        mine = [r for r in runs if r["system"] == name]
        curve = system_curve(mine)
        reached = first_reaching(curve, target)
        rates = [phase_rates(r) for r in mine]
        systems[name] = {
            "runs": len(mine), "curve": curve, "final": curve[-1],
            "seconds_to_target": reached["seconds"] if reached else None,
            "samples_to_target": reached["samples"] if reached else None,
            "rates": {key: mean([r[key] for r in rates if r.get(key)])
                      for key in rates[0] if any(r.get(key) for r in rates)},
            "peak_rss_largest_process_mib": max(r["peak_rss_largest_process_mib"] for r in mine),
            "peak_rss_tree_mib": max(r["peak_rss_tree_mib"] for r in mine),
            "wall_s": mean([r["wall_s"] for r in mine]), "cpu_s": mean([r["cpu_s"] for r in mine]),
            "load_mean": mean([r["load_mean"] for r in mine]),
        }
    # The same accuracy for both: the best mean accuracy that the weaker system reached.
    common = min(max(p["accuracy"] for p in s["curve"]) for s in systems.values())
    at_common = {name: first_reaching(s["curve"], common) for name, s in systems.items()}
    ratio = at_common["trl"]["seconds"] / at_common["pipeline"]["seconds"]
    return {"teacher_accuracy": teacher, "target": target, "systems": systems, "common_accuracy": common,
            "at_common": at_common, "speedup_vs_trl": ratio,
            "clock_pipeline": clock_per_iteration([r for r in runs if r["system"] == "pipeline"]),
            "clock_trl": clock_per_iteration([r for r in runs if r["system"] == "trl"])}


# ---- the whole benchmark -------------------------------------------------------------------

def warm_up() -> None:
    """Untimed: DeepSpeed's shared-memory comm op compiles on first use (cached in TORCH_EXTENSIONS_DIR)."""
    say("warm-up: DeepSpeed's CPU comm op (compiled once, then cached)")
    subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; "
                    "ShareMemCommBuilder().load()"], cwd=ROOT, check=True, capture_output=True)


def run_benchmark(iterations: int, rounds: int, time_cap_s: float, work: Path, threads: int,
                  overrides: list[str], eval_every: int) -> tuple[list[dict], dict]:
    shutil.rmtree(work, ignore_errors=True)  # fresh run folders and MLflow database
    work.mkdir(parents=True)
    warm_up()
    runs = []
    for round_ in range(1, rounds + 1):
        for system in ("pipeline", "trl"):
            say(f"round {round_}/{rounds}: {system}, {iterations} x {SAMPLES_PER_ITERATION} samples "
                f"(load {os.getloadavg()[0]:.2f})")
            folder = work / f"{system}-{round_}"
            run = (pipeline_run(folder, iterations, time_cap_s, [f"threads={threads}", *overrides])
                   if system == "pipeline" else trl_run(folder, iterations, time_cap_s, threads))
            run["round"] = round_
            last = run["checkpoints"][-1]
            say(f"{system} round {round_}: {run['wall_s']:.1f}s wall, "
                f"{last['samples']} samples by {last['seconds']:.1f}s, "
                f"peak RSS {run['peak_rss_tree_mib']:.0f} MiB (tree), load {run['load_mean']:.2f}"
                + (" [time cap]" if run["time_capped"] else ""))
            runs.append(run)
            (work / "runs.json").write_text(json.dumps(runs, indent=1))
    paths = [str(ASSETS / "teacher"), str(ASSETS / "student")]
    paths += [c["path"] for r in runs for c in r["checkpoints"]
              if c["version"] > 0 and (c["version"] % eval_every == 0 or c is r["checkpoints"][-1])]
    say(f"evaluating {len(paths)} models (teacher, student, every {eval_every}. checkpoint and the last) "
        "with tiny_world.evaluate.accuracy")
    accuracies = evaluate(paths, work)
    apply_accuracies(runs, accuracies)
    (work / "runs.json").write_text(json.dumps(runs, indent=1))
    return runs, summarise(runs, accuracies[str(ASSETS / "teacher")])


# ---- reporting ---------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    names = ("torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "tokenizers", "psutil")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def fmt_s(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:.0f} s"


def render_markdown(runs: list[dict], summary: dict, command: str, iterations: int, rounds: int) -> str:
    p, t = summary["systems"]["pipeline"], summary["systems"]["trl"]
    teacher, target = summary["teacher_accuracy"], summary["target"]
    lines = [
        "# Benchmark: this pipeline vs TRL's on-policy distillation (tiny world)",
        "",
        f"Written by `{command}` on {date.today().isoformat()}. Method: the docstring of `bench/peers.py`.",
        "",
        f"- machine: {machine()}, {platform.system()} {platform.release()}; shared with other jobs: "
        "mean 1-min load average during the runs "
        f"{p['load_mean']:.2f} (pipeline) and {t['load_mean']:.2f} (TRL), against 2 cores",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- each run: {iterations} x {SAMPLES_PER_ITERATION} student samples (64 prompts x 4, "
        f"{iterations * 4} optimizer steps of 64 samples), {rounds} runs per system, alternating",
        "- pipeline command: `" + runs[0]["command"].replace(sys.executable, "python") + "`",
        "- TRL command: `python -m bench.peers trl --out DIR --iterations N` (trl.DistillationTrainer, beta=1)",
        f"- evaluator for every model: `tiny_world.evaluate.accuracy` (500 eval prompts, 1 sample at temperature 1, "
        f"64 tokens, seed 0); teacher {teacher:.3f}, target 80% of it = {target:.3f}",
        "",
        "## Runs",
        "",
        "| run | system | samples reached | clock at its last checkpoint | wall (CPU) | mean load | stopped by |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['round']} | {r['system']} | {r['checkpoints'][-1]['samples']} | "
          f"{r['checkpoints'][-1]['seconds']:.0f} s "
          f"| {r['wall_s']:.0f} s ({r['cpu_s']:.0f} s) | {r['load_mean']:.2f} | "
          f"{'the time cap' if r['time_capped'] else 'its sample budget'} |" for r in runs],
        "",
        "## Accuracy after equal sample budgets",
        "",
        "Eval accuracy of the checkpoint after that many student samples (mean of the runs, each run in brackets), "
        "and the run's clock at that checkpoint (launch to checkpoint, start-up included). A run stopped by the "
        "time cap has no figure past its last checkpoint; '-': no run of that system got there.",
        "",
        "| samples | pipeline accuracy | TRL accuracy | pipeline clock | TRL clock |",
        "|---|---|---|---|---|",
    ]
    pipe_points, trl_points = ({c["samples"]: c for c in s["curve"]} for s in (p, t))

    def cell(point: dict | None) -> str:
        return f"{point['accuracy']:.3f} ({', '.join(f'{a:.3f}' for a in point['accuracies'])})" if point else "-"

    def clock(point: dict | None) -> str:
        return f"{point['seconds']:.0f} s ({', '.join(f'{x:.0f}' for x in point['all_seconds'])})" if point else "-"

    for samples in sorted(set(pipe_points) | set(trl_points)):
        mine, other = pipe_points.get(samples), trl_points.get(samples)
        lines.append(f"| {samples} | {cell(mine)} | {cell(other)} | {clock(mine)} | {clock(other)} |")
    common = summary["common_accuracy"]
    lines += [
        "",
        "## Time to accuracy",
        "",
        "| | pipeline | TRL |",
        "|---|---|---|",
        f"| wall time to {target:.3f} (80% of the teacher) | {fmt_s(p['seconds_to_target'])} | "
        f"{fmt_s(t['seconds_to_target'])} |",
        f"| accuracy at the last checkpoint ({p['final']['samples']} / {t['final']['samples']} samples) | "
        f"{p['final']['accuracy']:.3f} | {t['final']['accuracy']:.3f} |",
        f"| wall time to {common:.3f} (best accuracy both reached) | "
        f"{summary['at_common']['pipeline']['seconds']:.0f} s "
        f"({summary['at_common']['pipeline']['samples']} samples) | {summary['at_common']['trl']['seconds']:.0f} s "
        f"({summary['at_common']['trl']['samples']} samples) |",
        f"| whole run, wall (CPU) | {p['wall_s']:.0f} s ({p['cpu_s']:.0f} s) | "
        f"{t['wall_s']:.0f} s ({t['cpu_s']:.0f} s) |",
        f"| peak RSS, largest process | {p['peak_rss_largest_process_mib']:.0f} MiB | "
        f"{t['peak_rss_largest_process_mib']:.0f} MiB |",
        f"| peak RSS, whole process tree (sampled every 0.5 s) | {p['peak_rss_tree_mib']:.0f} MiB | "
        f"{t['peak_rss_tree_mib']:.0f} MiB |",
        "",
        f"Speed-up to the same accuracy ({common:.3f}): TRL's time / the pipeline's = "
        f"**{summary['speedup_vs_trl']:.2f}x** (goal: >= 2x).",
        "",
        "## Throughput per phase (tokens/s, mean of the runs)",
        "",
        "Generation counts response tokens, teacher scoring prompt + response tokens, training response tokens "
        "(padding excluded). 'Core' is the phase's own work; the pipeline's 'process' figure divides by the wall "
        "time of the whole stage process (Python start-up, imports, loading, DeepSpeed set-up, shard and "
        "checkpoint writing included).",
        "",
        "| phase | pipeline, core | pipeline, process | TRL, core |",
        "|---|---|---|---|",
    ]
    names = {"generate": "generation", "teacher": "teacher scoring", "train": "training"}
    for key, label in names.items():
        lines.append(f"| {label} | {p['rates'].get(key, 0):,.0f} | {p['rates'].get(key + '_process', 0):,.0f} | "
                     f"{t['rates'].get(key, 0):,.0f} |")
    lines += ["", "## Where the time goes", "",
              "Seconds per iteration (256 samples) after the first (which also holds start-up), mean over "
              "iterations and runs.", ""]
    lines += bounds(runs)
    return "\n".join(lines) + "\n"


def steady(runs: list[dict], key: str, field: str = "seconds") -> float:
    """A phase's figure per iteration (256 samples) after the first, mean over iterations and runs."""
    values = [record[key].get(field, 0.0) for r in runs for record in (r["per_iteration"][1:] or r["per_iteration"])]
    return mean(values) if values else float("nan")


def clock_per_iteration(runs: list[dict]) -> float:
    """Clock between the first and the last checkpoint, per iteration (start-up and iteration 0 left out)."""
    spans = [(r["checkpoints"][-1]["seconds"] - r["checkpoints"][1]["seconds"]) / (len(r["checkpoints"]) - 2)
             for r in runs if len(r["checkpoints"]) > 2]
    return mean(spans) if spans else float("nan")


def bounds(runs: list[dict]) -> list[str]:
    """Seconds per iteration by phase, core work against the rest, for each system; what bounds the ratio."""
    pipe_runs = [r for r in runs if r["system"] == "pipeline"]
    trl_runs = [r for r in runs if r["system"] == "trl"]
    phases = (("generate", "generation"), ("teacher", "teacher scoring"), ("train", "training"))
    pipe = {k: steady(pipe_runs, k) for k, _ in phases}
    process = {k: steady(pipe_runs, k, "process_s") for k, _ in phases}
    trl = {k: steady(trl_runs, k) for k, _ in phases}
    rows = ["| seconds per iteration | pipeline | TRL |", "|---|---|---|"]
    for key, label in phases:
        rows.append(f"| {label}: the phase's own work | {pipe[key]:.1f} | {trl[key]:.1f} |")
    rows.append(f"| all three phases' own work | {sum(pipe.values()):.1f} | {sum(trl.values()):.1f} |")
    for key, label in phases:
        rows.append(f"| pipeline {label} stage process, wall (own work + the rest) | {process[key]:.1f} "
                    f"({pipe[key]:.1f} + {process[key] - pipe[key]:.1f}) | - |")
    setup = steady(pipe_runs, "train", "setup_s")
    rows.append(f"| of which the train stage's set-up (model load, DeepSpeed init, optimizer state) | {setup:.1f} "
                "| - |")
    pipe_clock, trl_clock = clock_per_iteration(pipe_runs), clock_per_iteration(trl_runs)
    rows.append(f"| clock per iteration, after the first | {pipe_clock:.1f} | {trl_clock:.1f} |")
    first_pipe = mean([r["checkpoints"][1]["seconds"] for r in pipe_runs if len(r["checkpoints"]) > 1])
    first_trl = mean([r["checkpoints"][1]["seconds"] for r in trl_runs if len(r["checkpoints"]) > 1])
    rows.append(f"| clock at the first checkpoint (start-up + iteration 0) | {first_pipe:.1f} | {first_trl:.1f} |")
    setup_trl = [r["setup_s"] for r in trl_runs if r.get("setup_s")]
    if setup_trl:
        rows.append(f"| TRL: launch to its first step (imports, loading, trainer set-up) | - | {mean(setup_trl):.1f} |")
    overhead = sum(process.values()) - sum(pipe.values())
    rows += [
        "",
        f"Per iteration the pipeline's three stage processes take {sum(process.values()):.1f} s of wall time, of which "
        f"{sum(pipe.values()):.1f} s is the phases' own work (sampling, teacher forward, optimizer steps). The other "
        f"{overhead:.1f} s ({overhead / max(sum(process.values()), 1e-9):.0%}) is what one fresh process per stage per "
        "iteration costs: Python and library imports, loading models, DeepSpeed's set-up, the verifier's workers, "
        "writing and hashing shards and checkpoints. TRL pays its start-up once per run. "
        f"Projection, not a measurement: without that overhead (engines resident across iterations) an iteration "
        f"would take about {sum(pipe.values()):.1f} s plus orchestration, against TRL's {trl_clock:.1f} s, a ratio of "
        f"about {trl_clock / max(sum(pipe.values()), 1e-9):.1f}x at equal samples.",
    ]
    return rows


def result_rows(summary: dict) -> list[dict]:
    """The rows of bench/results/peers.json (bench/summary.py's format)."""
    p, t = summary["systems"]["pipeline"], summary["systems"]["trl"]
    rows = [
        {"metric": "teacher eval accuracy (reference)", "value": summary["teacher_accuracy"], "unit": "fraction",
         "goal": "", "met": None},
        {"metric": f"pipeline eval accuracy after {p['final']['samples']} samples", "value": p["final"]["accuracy"],
         "unit": "fraction", "goal": f">= {summary['target']:.3f} (80% of teacher)",
         "met": p["final"]["accuracy"] >= summary["target"]},
        {"metric": f"TRL eval accuracy after {t['final']['samples']} samples", "value": t["final"]["accuracy"],
         "unit": "fraction", "goal": "", "met": None},
    ]
    same_budget = next((c for c in t["curve"] if c["samples"] == p["final"]["samples"]), None)
    if same_budget is not None and t["final"]["samples"] != p["final"]["samples"]:
        rows.append({"metric": f"TRL eval accuracy after {p['final']['samples']} samples (the pipeline's budget)",
                     "value": same_budget["accuracy"], "unit": "fraction", "goal": "", "met": None})
    rows += [
        {"metric": "pipeline clock per iteration of 256 samples (after the first)", "value": summary["clock_pipeline"],
         "unit": "s", "goal": "", "met": None},
        {"metric": "TRL clock per iteration of 256 samples (after the first)", "value": summary["clock_trl"],
         "unit": "s", "goal": "", "met": None},
        {"metric": f"pipeline wall time to {summary['common_accuracy']:.3f} accuracy",
         "value": summary["at_common"]["pipeline"]["seconds"], "unit": "s", "goal": "", "met": None},
        {"metric": f"TRL wall time to {summary['common_accuracy']:.3f} accuracy",
         "value": summary["at_common"]["trl"]["seconds"], "unit": "s", "goal": "", "met": None},
        {"metric": "speed-up vs TRL to the same accuracy", "value": summary["speedup_vs_trl"], "unit": "x",
         "goal": ">= 2", "met": summary["speedup_vs_trl"] >= 2},
    ]
    for system, figures in (("pipeline", p), ("TRL", t)):
        if figures["seconds_to_target"] is not None:
            rows.append({"metric": f"{system} wall time to 80% of teacher accuracy",
                         "value": figures["seconds_to_target"],
                         "unit": "s", "goal": "", "met": None})
        for key, label in (("generate", "generation"), ("teacher", "teacher scoring"), ("train", "training")):
            if figures["rates"].get(key):
                rows.append({"metric": f"{system} {label} throughput (core)", "value": figures["rates"][key],
                             "unit": "tokens/s", "goal": "", "met": None})
        rows.append({"metric": f"{system} peak RSS (largest process)", "value": figures["peak_rss_largest_process_mib"],
                     "unit": "MiB", "goal": "", "met": None})
    return [{**r, "value": round(r["value"], 4)} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10,
                        help="iterations of 256 samples per run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per system, alternating (default: %(default)s)")
    parser.add_argument("--time-cap-s", type=float, default=540, help="wall-time cap of one run (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=2,
                        help="evaluate checkpoints v_k with k a multiple of this, and each run's last "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process, both systems (default: %(default)s = torch's default)")
    parser.add_argument("--pipeline-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for the pipeline, e.g. orchestrator.mode=resident (repeatable)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-peers",
                        help="run folders (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md", help="report (default: %(default)s)")
    commands = parser.add_subparsers(dest="command")
    trl = commands.add_parser("trl", help="internal: one TRL run")
    trl.add_argument("--out", type=Path, required=True)
    trl.add_argument("--iterations", type=int, required=True)
    trl.add_argument("--launch", type=float, required=True)
    trl.add_argument("--threads", type=int, default=0)
    report = commands.add_parser("report", help="write the report again from <work>/runs.json and <work>/eval.json")
    report.add_argument("--eval-missing", action="store_true", help="first evaluate the checkpoints not yet graded")
    ev = commands.add_parser("evaluate", help="internal: eval accuracy of model folders")
    ev.add_argument("--out", type=Path, required=True)
    ev.add_argument("paths", nargs="+")
    args = parser.parse_args()
    if args.command == "trl":
        trl_main(args.out, args.iterations, args.launch, args.threads)
    elif args.command == "evaluate":
        evaluate_main(args.paths, args.out)
    else:
        started = time.time()
        command = " ".join(["python -m bench.peers", *sys.argv[1:]])
        if args.command == "report":
            runs, summary, command = report_again(args.work, args.eval_missing)
        else:
            (args.work.parent).mkdir(parents=True, exist_ok=True)
            runs, summary = run_benchmark(args.iterations, args.rounds, args.time_cap_s, args.work, args.threads,
                                          args.pipeline_override, args.eval_every)
            (args.work / "command.json").write_text(json.dumps({"command": command}))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render_markdown(runs, summary, command.strip(), args.iterations, args.rounds))
        written = write_results("peers", "make bench-peers", result_rows(summary))
        say(f"wrote {args.out} and {written} ({(time.time() - started) / 60:.1f} min); "
            f"speed-up vs TRL to {summary['common_accuracy']:.3f} accuracy: {summary['speedup_vs_trl']:.2f}x")


if __name__ == "__main__":
    main()
