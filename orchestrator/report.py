"""`make report`: one PNG of a run's learning curves, also logged to its MLflow run as an artifact.

Panels, against iteration i (policy v_i): accuracy (rollouts and eval split, with the teacher's eval
accuracy as a reference line), mean reward, mean reverse KL, response length, length health (the
fraction of rollouts cut at the length limit and the sampling distribution's entropy: the early
signs of a length collapse), each stage's throughput and each stage's wall time, and pass@k against
k for v0, the latest checkpoint and the teacher (from `make eval K=...`'s folders). Curves come from
the MLflow run, the same numbers the UI shows.

The teacher's accuracy is not logged by `iterate` (the loop never runs the teacher on the eval
split); the report measures it once with exactly the student's eval settings (same rendered prompts,
sampling parameters and seed), caches it in runs/<RUN>/teacher_eval.json and logs it to MLflow as
`eval.teacher_accuracy`. About 10 s on the tiny world, once per run.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from common import shards
from common.config import teacher_routes
from common.errors import UserError
from common.metrics import EVAL_ACCURACY, REVERSE_KL, ROLLOUT_ACCURACY
from common.run import load_run_config
from orchestrator.runs import mlflow_run, require_run

REPORT = "report.png"
TEACHER_CACHE = "teacher_eval.json"
TEACHER_METRIC = "eval.teacher_accuracy"

# (title, [(metric, label)]) per panel, in reading order.
PANELS = [
    ("accuracy", [("rollout.accuracy", "rollouts (train prompts)"), ("eval.accuracy", "eval split")]),
    ("mean reward", [("rollout.reward_mean", "rollouts")]),
    ("mean reverse KL (lp - lq per token)", [("rollout.reverse_kl", "rollouts")]),
    ("response length (tokens)", [("generate.mean_response_length", "rollouts"),
                                  ("eval.mean_response_length", "eval split")]),
    ("length health", [("generate.truncated_fraction", "rollouts cut at the length limit (fraction)"),
                       ("generate.entropy", "entropy of the sampling distribution (nats/token)")]),
    ("stage throughput (tokens/s)", [("generate.tokens_per_s", "generate"),
                                     ("score.tokens_per_s", "score (prompt + response)"),
                                     ("train.tokens_per_s", "train")]),
    ("stage wall time (s)", [("time.generate_wall_s", "generate"), ("time.score_wall_s", "score"),
                             ("time.train_wall_s", "train")]),
]


def teacher_eval(run: Path, k: int | None = None) -> dict:
    """The teachers' accuracy (and, with k >= 2, pass@k) on the eval sets, under the student's eval
    settings, each set by the teacher its data_source is routed to (score.teachers); cached per run and k.

    The loop's own evaluator (stages/generate/jobs.py: evaluate_engine) on an engine holding each
    teacher: the same rendered prompts, shards, seeds, sampling and grading as `eval.accuracy`.
    """
    from common.config import teacher_for
    from common.hub import local_model_dir
    from common.libraries import quiet_libraries, set_threads
    from common.modeling import load_tokenizer
    from common.shards import policy_version
    from stages.generate.engines import open_engine
    from stages.generate.jobs import evaluate_engine
    from stages.generate.plan import eval_jobs

    config = load_run_config(run)
    k = k or config.eval.k
    key = {"teachers": {model: policy_version(local_model_dir(model))
                        for model in dict.fromkeys(teacher_routes(config).values())},
           "eval": dataclasses.asdict(config.eval), "k": k, "seed": config.seed,
           "rows_per_shard": config.generate.rows_per_shard, "shards": config.generate.shards,
           "engine": config.generate.engine, "routes": teacher_routes(config), "reward_mode": config.score.reward_mode}
    cache = Path(run) / (TEACHER_CACHE if k == config.eval.k else f"teacher_eval-k{k}.json")
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            return cached
    quiet_libraries()
    set_threads(config)
    student = shards.checkpoint_dir(run, 0)  # renders the sets with the student's tokenizer, as the loop does
    routed: dict[str, set[str]] = {}
    for job in eval_jobs(config, run, k, lambda: load_tokenizer(student)):
        routed.setdefault(teacher_for(config, job.eval_set), set()).add(job.eval_set)
    metrics: dict[str, float] = {}
    for model, sets in routed.items():
        engine = open_engine(config, local_model_dir(model))
        try:
            metrics.update({name: value for name, value in evaluate_engine(config, run, engine, k, sets).items()
                            if name.count("/") == 2})  # per set; the mean over all sets follows
        finally:
            engine.close()
    accuracies = [value for name, value in metrics.items() if name.endswith("/accuracy")]
    metrics[EVAL_ACCURACY] = sum(accuracies) / len(accuracies)
    result = {"key": key, "accuracy": metrics[EVAL_ACCURACY], "metrics": metrics}
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


def pass_at_k_curves(run: Path, teacher: bool = True) -> dict[str, tuple[list[int], list[float]]]:
    """pass@k against k, the mean over the eval sets, of v0, the latest evaluated checkpoint and the
    teacher(s): from the eval folders `make eval K=...` wrote (the largest k that v0 has)."""
    found: dict[tuple[int, int], dict] = {}
    for path in Path(run).glob(f"iter=*/eval*/{shards.MANIFEST}"):
        metrics = shards.read_manifest(path.parent).metrics
        ks = {int(name.rsplit("@", 1)[1]) for name in metrics if "/pass@" in name}
        if ks:
            found[(int(path.parent.parent.name.split("=")[1]), max(ks))] = metrics
    if not any(iteration == 0 for iteration, _ in found):
        return {}
    k = max(kk for iteration, kk in found if iteration == 0)
    latest = max(iteration for iteration, kk in found if kk == k)

    def curve(metrics: dict) -> tuple[list[int], list[float]]:
        ks = sorted({int(name.rsplit("@", 1)[1]) for name in metrics if "/pass@" in name})
        return ks, [sum(v for name, v in metrics.items() if name.endswith(f"/pass@{kk}") and name.count("/") == 2)
                    / sum(1 for name in metrics if name.endswith(f"/pass@{kk}") and name.count("/") == 2) for kk in ks]

    curves = {"v0 (the student)": curve(found[(0, k)])}
    if latest:
        curves[f"v{latest} (latest)"] = curve(found[(latest, k)])
    if teacher:
        curves["teacher"] = curve(teacher_eval(run, k)["metrics"])
    return curves


def histories(client, run_id: str) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) of every metric the panels use, one value per step (the last logged)."""
    curves = {}
    for _, series in PANELS:
        for metric, _ in series:
            points = {m.step: m.value for m in sorted(client.get_metric_history(run_id, metric),
                                                       key=lambda m: (m.step, m.timestamp))}
            if points:
                steps = sorted(points)
                curves[metric] = (steps, [points[s] for s in steps])
    return curves


def plot(curves: dict, teacher_accuracy: float | None, title: str, path: Path,
         pass_at_k: dict[str, tuple[list[int], list[float]]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also keeps report working over ssh and in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7), constrained_layout=True)
    ax = axes.flat[-1]
    for label, (ks, values) in (pass_at_k or {}).items():
        ax.plot(ks, values, marker="o", markersize=3, label=label, **({"color": "black", "linestyle": "--"}
                                                                      if label == "teacher" else {}))
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_title("pass@k on the eval sets (make eval K=...)", fontsize=10)
    ax.set_xlabel("k (samples per prompt)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if pass_at_k:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "none yet: `make eval CKPT=0 K=16`\nand `make eval K=16`", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
    for ax, (panel, series) in zip(axes.flat, PANELS):
        for metric, label in series:
            if metric in curves:
                steps, values = curves[metric]
                ax.plot(steps, values, marker="o", markersize=3, label=label)
        if panel == "accuracy":
            if teacher_accuracy is not None:
                ax.axhline(teacher_accuracy, color="black", linestyle="--", linewidth=1,
                           label=f"teacher, eval split ({teacher_accuracy:.3f})")
            ax.set_ylim(0, 1.02)
        if panel.startswith("stage throughput"):
            ax.set_yscale("log")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("iteration (policy v_i)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def learning_table(run: Path) -> str:
    """The run's learning curve as a Markdown table, from its sealed stage manifests: eval accuracy at
    each evaluated checkpoint, rollout accuracy and mean reverse KL of the iterations there, and the wall
    time since the run's first stage started (meaningful for a run made by one uninterrupted command)."""
    run = require_run(run)
    # Keyed by folder name, not the manifest's stage: `make eval` writes eval-k<K> folders beside eval.
    manifests = {(m.iteration, path.parent.name): m for path in run.glob(f"iter=*/*/{shards.MANIFEST}")
                 if (m := shards.read_manifest(path.parent))}
    if not manifests:
        raise UserError(f"{run} has no finished stage yet", f"run `make iterate RUN={run.name}` first")
    started = min(m.started_at for m in manifests.values())
    evals = sorted(i for i, stage in manifests if stage == "eval")

    def metric(iteration: int, stage: str, name: str) -> str:
        manifest = manifests.get((iteration, stage))
        return f"{manifest.metrics[name]:.3f}" if manifest else ""

    def elapsed(iteration: int) -> str:
        return f"{(manifests[(iteration, 'eval')].finished_at - started) / 60:.1f}"

    trained = sorted(i for i, stage in manifests if stage == "train")
    config = load_run_config(run)
    rows = [
        ("iteration", [str(i) for i in evals]),
        (f"eval accuracy, sampled ({config.eval.prompts or 'all'} prompts)", [metric(i, "eval", EVAL_ACCURACY)
                                                                             for i in evals]),
        ("rollout accuracy (that iteration's samples)", [metric(i, "scored", ROLLOUT_ACCURACY) for i in evals]),
        ("mean reverse KL, lp - lq per token", [metric(i, "scored", REVERSE_KL) for i in evals]),
        ("wall time at the eval (min)", [elapsed(i) for i in evals]),
    ]
    lines = [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    lines.insert(1, "|---|" + "---|" * len(evals))
    if trained:
        last = manifests[(trained[-1], "train")]
        lines.append(f"\n{len(trained)} iterations; final weights `{last.produced_version}`.")
    cache = run / TEACHER_CACHE
    if cache.exists():
        lines.append(f"Teacher eval accuracy, same settings: {json.loads(cache.read_text())['accuracy']:.3f}.")
    return "\n".join(lines)


def report(run: Path, out: Path | None = None, teacher: bool = True) -> Path:
    """Write the run's report PNG (default runs/<RUN>/report.png) and log it to its MLflow run."""
    run = require_run(run)
    uri, run_id = mlflow_run(run)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    teacher_accuracy = None
    if teacher:
        measured = teacher_eval(run)
        teacher_accuracy = measured["accuracy"]
        if client.get_run(run_id).data.metrics.get(TEACHER_METRIC) != teacher_accuracy:
            client.log_metric(run_id, TEACHER_METRIC, teacher_accuracy, step=0)
    curves = histories(client, run_id)
    config = load_run_config(run)
    title = (f"{run.name}: {config.generate.prompts_per_iteration} prompts x {config.generate.n} samples per "
             f"iteration, lr {config.train.lr:g}, loss {config.train.loss}")
    path = out or run / REPORT
    plot(curves, teacher_accuracy, title, path, pass_at_k_curves(run, teacher))
    client.log_artifact(run_id, str(path))
    return path
