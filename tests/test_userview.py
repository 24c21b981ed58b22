"""The user's view on tiny runs: progress and summaries, report PNG, compare, inspect, --help, errors."""
import os
import runpy
import subprocess
import sys
import time

import pytest
from pipeline_helpers import OVERRIDES, orchestrate

from common import shards
from common.progress import Progress, progress_enabled, stage_summary


def python(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OPD_PROGRESS", "FORCE_COLOR")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def runs(reference_run):
    """Two runs in one runs folder: alpha, the shared two-iteration reference run (eval every
    iteration), and beta, another lr with 0 iterations (only the eval of the initial student)."""
    root = reference_run.parent
    beta = orchestrate(root / "beta", 0, "-o", "train.lr=5e-4")
    assert beta.returncode == 0, beta.stderr[-3000:]
    alpha = subprocess.CompletedProcess([], 0, (root / "reference.out").read_text(), (root / "reference.err").read_text())
    return root, alpha


def test_progress_is_quiet_without_a_terminal_and_forced_with_env(monkeypatch, capsys):
    monkeypatch.delenv("OPD_PROGRESS", raising=False)
    assert not progress_enabled()  # pytest captures stderr: not a TTY
    monkeypatch.setenv("OPD_PROGRESS", "1")
    with Progress(4, "score") as bar:
        bar.update(2, 100)
        time.sleep(0.2)  # tqdm redraws at most every 0.1 s
        bar.update(2, 100)
    assert "tok/s" in capsys.readouterr().err
    line = stage_summary("score", 3, 256, 5120, 1000.0, 4.3, "accuracy 0.5")
    assert line == "score iter 3: 256 rows, 5,120 tokens, 1,000 tok/s, 4.3s | accuracy 0.5"


def test_iterate_echoes_config_and_prints_one_summary_per_stage(runs):
    _, alpha = runs
    assert "config " in alpha.stdout and "configs/tiny.yaml" in alpha.stdout
    assert "overrides: " + " ".join(OVERRIDES) in alpha.stdout
    for iteration in (0, 1):
        for stage in ("generate", "score", "train", "eval"):
            lines = [line for line in alpha.stdout.splitlines() if line.startswith(f"{stage} iter {iteration}: 16 rows, ")]
            assert len(lines) == 1, (stage, iteration, alpha.stdout)
            assert " tok/s, " in lines[0]
    assert "\r" not in alpha.stderr  # no progress bars in captured (CI) output


def test_report_table_is_the_learning_curve_of_the_manifests(reference_run):
    from orchestrator.report import learning_table

    table = learning_table(reference_run).splitlines()
    assert table[0] == "| iteration | 0 | 1 | 2 |"
    evals = [shards.read_manifest(shards.stage_dir(reference_run, i, "eval")).metrics["eval/accuracy"]
             for i in range(3)]
    assert table[2] == "| eval accuracy, sampled (16 prompts) | " + " | ".join(f"{a:.3f}" for a in evals) + " |"
    scored = [shards.read_manifest(shards.stage_dir(reference_run, i, "scored")).metrics for i in range(2)]
    assert table[4].endswith(" | ".join(f"{m['rollout/reverse_kl']:.3f}" for m in scored) + " |  |")  # v2: no rollouts
    final = shards.read_manifest(shards.stage_dir(reference_run, 1, "train")).produced_version
    assert f"2 iterations; final weights `{final}`." in table


def test_report_writes_a_png_and_logs_it_to_mlflow(runs):
    root, _ = runs
    result = python("-m", "orchestrator", "report", "--run", str(root / "reference"))
    assert result.returncode == 0, result.stderr[-3000:]
    png = root / "reference" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import mlflow

    from orchestrator.report import histories

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run_id = (root / "reference" / "mlflow_run_id").read_text().strip()
    assert "report.png" in [a.path for a in client.list_artifacts(run_id)]
    # The curves the report draws are the stage manifests' metrics, iteration by iteration (the time.*
    # curves are the loop's own clock, logged by it; they are not in any manifest).
    curves = histories(client, run_id)
    stage_of = {"rollout": "scored", "score": "scored", "generate": "rollouts", "train": "train", "eval": "eval"}
    drawn = {metric: points for metric, points in curves.items() if not metric.startswith("time.")}
    assert {"rollout.accuracy", "eval.accuracy", "rollout.reverse_kl", "train.tokens_per_s"} <= set(drawn)
    for metric, (steps, values) in drawn.items():
        prefix = metric.split(".")[0]
        from_manifests = [shards.read_manifest(shards.stage_dir(root / "reference", step, stage_of[prefix]))
                          .metrics[metric.replace(".", "/")] for step in steps]
        assert values == pytest.approx(from_manifests, rel=1e-12), metric
        assert steps == list(range(len(steps))), metric  # every iteration, none missing
    teacher = client.get_run(run_id).data.metrics["eval.teacher_accuracy"]
    assert 0.5 < teacher <= 1.0  # the tiny teacher samples ~99% correct


def test_compare_lists_both_runs(runs):
    root, _ = runs
    result = python("-m", "orchestrator", "compare", "--runs", "reference,beta", "--root", str(root))
    assert result.returncode == 0, result.stderr[-3000:]
    header = next(line for line in result.stdout.splitlines() if "reference" in line)
    assert "beta" in header
    lr_row = next(line for line in result.stdout.splitlines() if line.strip().startswith("train.lr"))
    assert "0.0001" in lr_row and "0.0005" in lr_row
    assert "mean reverse KL" in result.stdout and "eval accuracy" in result.stdout


def test_inspect_shows_summaries_and_the_token_table(runs):
    root, _ = runs
    result = python("-m", "orchestrator", "inspect", "--run", str(root / "reference"), "--iter", "1", "--row", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter=0001/scored (16 rows" in result.stdout and "reverse_kl" in result.stdout
    assert "row 0: prompt" in result.stdout
    for column in ("pos", "token", "student lp", "teacher lp", "lp - lq"):
        assert column in result.stdout
    assert "\x1b[" not in result.stdout  # colour only in a terminal


ENTRY_POINTS = [
    ["-m", "orchestrator"], ["-m", "orchestrator", "iterate"], ["-m", "orchestrator", "inspect"],
    ["-m", "orchestrator", "report"], ["-m", "orchestrator", "compare"], ["-m", "orchestrator", "eval"],
    ["-m", "orchestrator", "check"], ["-m", "orchestrator", "workers"], ["-m", "common.verifier"],
    ["-m", "stages.generate"], ["-m", "stages.score"], ["-m", "stages.train"],
    ["-m", "tiny_world.build"], ["-m", "tiny_world.evaluate"], ["-m", "tiny_world.sft_check"],
    ["-m", "rehearsal.rehearse"], ["-m", "rehearsal.long_rows"], ["-m", "rehearsal.gate_gap"], ["-m", "bench.peers"],
    ["-m", "bench.gpu_check"],
]


def test_help_works_everywhere(monkeypatch, capsys):
    # In this process (each entry point's own `__main__`, as `python -m` runs it): 16 cold starts that
    # each import torch cost most of a minute on two cores.
    for entry in ENTRY_POINTS:
        module, *rest = entry[1:]
        monkeypatch.setattr(sys, "argv", [module, *rest, "--help"])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        assert exit_.value.code in (0, None), entry
        assert capsys.readouterr().out.startswith("usage:"), entry


USER_ERRORS = [
    (["inspect", "--run", "{root}/missing"], "no run folder"),
    (["inspect", "--run", "{root}/reference", "--iter", "99"], "iteration 99"),
    (["report", "--run", "{root}/missing"], "no run folder"),
    (["compare", "--runs", "reference,nope", "--root", "{root}"], "no run folder"),
    (["iterate", "--run", "{root}/x", "--config", "configs/missing.yaml"], "configs/missing.yaml"),
    (["workers", "--scheduler", "tcp://127.0.0.1:1"], "no GPU visible"),
    (["workers", "--scheduler", "tcp://127.0.0.1:1", "--workers", "1", "--roles", "teacher"], "roles teacher"),
]


def test_user_errors_are_one_line_naming_the_fix(runs):
    root, _ = runs
    env = {k: v for k, v in os.environ.items() if k not in ("OPD_PROGRESS", "FORCE_COLOR")}
    running = [(says, subprocess.Popen([sys.executable, "-m", "orchestrator", *[a.format(root=root) for a in args]],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
               for args, says in USER_ERRORS]  # all at once: each is mostly a cold start
    for says, process in running:
        _, stderr = process.communicate()
        assert process.returncode != 0, says
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert lines[0].startswith("error: ") and says in lines[0] and "(fix: " in lines[0]
