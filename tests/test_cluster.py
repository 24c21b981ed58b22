"""The GPU node's layout on this machine's analogue: which worker gets which GPU, rank and roles
(common/devices.py), workers that Dask never pauses, `python -m orchestrator workers` serving a run
byte-identical to the embedded cluster's, and shards for every generation worker."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from distributed import LocalCluster
from pipeline_helpers import orchestrate, rollout_digests

from common import shards
from common.config import load_config
from common.devices import check_torch_sees_the_gpus, embedded_layout, worker_layout
from common.errors import ConfigError
from common.shards import policy_version
from orchestrator.checks import check_run
from orchestrator.cluster import gpu_memory_plan, open_cluster, parameters
from orchestrator.loop import prepare_run


def layout(specs):
    return [(spec.name, spec.gpu, sorted(spec.resources)) for spec in specs]


@pytest.mark.parametrize("gpus", [["0"], ["0", "1"], ["0", "1", "2", "3"]], ids=["1-gpu", "2-gpus", "4-gpus"])
def test_each_gpu_gets_one_worker_with_every_role_and_the_rank_of_its_position(gpus):
    specs = worker_layout(gpus, prefix="node")
    assert layout(specs) == [(f"node-{gpu}", gpu, ["generate", "score", f"train-rank-{i}"])
                             for i, gpu in enumerate(gpus)]
    # Pinned: inside worker i, "cuda" is GPU gpus[i], where its engine, teacher and rank all compute.
    assert [spec.environment(threads=4) for spec in specs] == [{"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": gpu}
                                                               for gpu in gpus]


def test_a_second_node_numbers_its_ranks_after_the_first_nodes():
    first = worker_layout(["0", "1", "2", "3"], first_rank=0, prefix="a")
    second = worker_layout(["0", "1", "2", "3"], first_rank=4, prefix="b")
    ranks = [role for spec in first + second for role in spec.resources if role.startswith("train-rank-")]
    assert ranks == [f"train-rank-{r}" for r in range(8)]
    assert [spec.gpu for spec in second] == ["0", "1", "2", "3"]  # each node counts its own GPUs from 0


def test_the_cards_four_plus_four_layout_puts_the_teacher_alone_on_its_gpus():
    actors = worker_layout(["0", "1", "2", "3"], roles=("generate", "train"), prefix="n")
    teachers = worker_layout(["4", "5", "6", "7"], roles=("score",), prefix="n")
    assert [sorted(s.resources) for s in actors] == [["generate", f"train-rank-{r}"] for r in range(4)]
    assert [(s.gpu, sorted(s.resources)) for s in teachers] == [(g, ["score"]) for g in "4567"]


def test_without_gpus_the_workers_are_cpu_workers_and_only_the_configured_ranks_train():
    assert layout(embedded_layout(workers=0, train_processes=1, gpus=[])) == [
        ("worker-0", None, ["generate", "score", "train-rank-0"])]
    assert layout(embedded_layout(workers=3, train_processes=2, gpus=[])) == [
        ("worker-0", None, ["generate", "score", "train-rank-0"]), ("worker-1", None, ["generate", "score", "train-rank-1"]),
        ("worker-2", None, ["generate", "score"])]
    assert [s.gpu for s in embedded_layout(workers=0, train_processes=2, gpus=["0", "1", "2", "3"])] == ["0", "1", "2", "3"]


def test_layouts_that_cannot_work_are_refused_with_one_line():
    with pytest.raises(ConfigError, match="train.processes.*one rank per GPU"):
        embedded_layout(workers=0, train_processes=4, gpus=["0", "1"])
    with pytest.raises(ConfigError, match="cluster.workers.*one worker per GPU"):
        embedded_layout(workers=3, train_processes=1, gpus=["0", "1"])
    with pytest.raises(ConfigError, match="teacher"):
        worker_layout(["0"], roles=("teacher",))


def test_a_gpu_that_torch_cannot_use_stops_with_one_line():
    """This machine's torch is a CPU build: told that GPU 0 is visible, the check refuses to go on in
    fp32 on the CPU; with no GPU visible (the negative control) it lets the run go on."""
    with pytest.raises(ConfigError) as refused:
        check_torch_sees_the_gpus(["0"])
    assert "cannot use them" in str(refused.value) and "\n" not in str(refused.value)
    check_torch_sees_the_gpus([])


def _memory_and_process(dask_worker):
    return {"limit": dask_worker.memory_manager.memory_limit, "daemon": multiprocessing.current_process().daemon,
            "threads": dask_worker.state.nthreads}


def test_embedded_workers_are_never_paused_spilled_or_terminated(capsys):
    """No memory limit (so no pausing, spilling or terminating, however large the models grow: the
    card's ZeRO-3 offload alone holds ~8 GB per rank), one task slot, not daemonic (vLLM's engine and
    the verifier's pool start processes), and the controller says so at start."""
    config = load_config("configs/tiny.yaml", ["cluster.workers=2"])
    with open_cluster(config) as client:
        workers = client.run(_memory_and_process)
    assert list(workers.values()) == [{"limit": None, "daemon": False, "threads": 1}] * 2
    assert "Dask memory management off" in capsys.readouterr().out


def test_workers_with_a_dask_memory_limit_are_refused_before_anything_runs():
    """A cluster started by hand with Dask's defaults would pause a worker at 80% of its share of the
    machine, silently: the run would hang after its first iteration. It is refused in one line."""
    resources = {"generate": 1, "score": 1, "train-rank-0": 1}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, memory_limit="4GiB", resources=resources,
                      dashboard_address=None) as cluster:
        config = load_config("configs/tiny.yaml", [f"cluster.address={cluster.scheduler_address}"])
        with pytest.raises(ConfigError, match="memory limit") as refused, open_cluster(config):
            pass
    assert "\n" not in str(refused.value)


def test_a_training_rank_on_two_workers_is_refused_before_anything_runs():
    """Two nodes started with the same --first-rank both offer train-rank-0: Dask would send each iteration's
    rank task to either worker, each with a trainer of its own. Refused in one line; one worker is taken."""
    resources = {"generate": 1, "score": 1, "train-rank-0": 1}
    for workers in (2, 1):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, memory_limit=0,
                          resources=resources, dashboard_address=None) as cluster:
            config = load_config("configs/tiny.yaml", [f"cluster.address={cluster.scheduler_address}"])
            if workers == 2:
                with pytest.raises(ConfigError, match="train-rank-0 is on") as refused, open_cluster(config):
                    pass
                assert "\n" not in str(refused.value)
            else:
                with open_cluster(config) as client:
                    assert len(client.scheduler_info(n_workers=-1)["workers"]) == 1


def test_the_default_cut_gives_every_generation_worker_a_shard_and_freezes_it(tmp_path):
    """generate.shards = 0: one shard per generation worker, so with 2 workers both sample and both
    score within one iteration; the count is frozen, so the run resumed on 1 worker keeps it."""
    run = tmp_path / "spread"
    result = orchestrate(run, 1, "-o", "cluster.workers=2", "-o", "eval.every=0", "-o", "generate.rows_per_shard=1024")
    assert result.returncode == 0, result.stderr[-3000:]
    rollouts = shards.read_manifest(shards.stage_dir(run, 0, "rollouts")).metrics
    scored = shards.read_manifest(shards.stage_dir(run, 0, "scored")).metrics
    assert (rollouts["generate/shards"], rollouts["generate/workers"], scored["score/workers"]) == (2, 2, 2)
    assert yaml.safe_load((run / "run.yaml").read_text())["generate"]["shards"] == 2
    resumed = prepare_run(run, load_config("configs/tiny.yaml"), force=True, generation_workers=1)
    assert resumed.generate.shards == 2


def _start(command: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def test_the_workers_command_serves_a_run_byte_identical_to_the_embedded_cluster(tmp_path):
    """A `dask scheduler` and two workers started by `python -m orchestrator workers --workers 2` (as
    on each node of a real cluster, --gpus there), a run through cluster.address with 2 training
    ranks: the same shards and checkpoints as the same run on the embedded cluster."""
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = _start([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                        "--no-dashboard", "--scheduler-file", str(scheduler_file)])
    workers = None
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        workers = _start([sys.executable, "-m", "orchestrator", "workers", "--scheduler", address, "--workers", "2"])
        lines = [workers.stdout.readline() for _ in range(3)]
        assert sum("roles generate,score,train-rank-" in line for line in lines) == 2, lines
        external = orchestrate(tmp_path / "external", 2, "-o", f"cluster.address={address}", "-o", "train.processes=2")
        assert external.returncode == 0, external.stderr[-3000:]
    finally:
        for process in (workers, scheduler):
            if process is not None:
                _stop(process)
    embedded = orchestrate(tmp_path / "embedded", 2, "-o", "cluster.workers=2", "-o", "train.processes=2")
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    for run in ("external", "embedded"):
        assert check_run(tmp_path / run) == (2, [])
    stages = ("rollouts", "scored", "eval")
    assert rollout_digests(tmp_path / "external", stages) == rollout_digests(tmp_path / "embedded", stages)
    assert [policy_version(shards.checkpoint_dir(tmp_path / "external", v)) for v in range(3)] == \
        [policy_version(shards.checkpoint_dir(tmp_path / "embedded", v)) for v in range(3)]


QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)
QWEN3_4B = dict(QWEN3_1_7B, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32)


def test_the_gpu_memory_plan_counts_the_real_models_and_flags_a_phase_that_does_not_fit():
    """Parameter counts from config.json equal the real models' (those rehearsal/models.py checks);
    the card's layout fits an 80 GB GPU, and an engine given 90% of it leaves no room for the teacher."""
    assert (parameters(QWEN3_1_7B), parameters(QWEN3_4B)) == (1_720_574_976, 4_022_468_096)
    card = load_config("configs/qwen3-1.7b-opd-dapo.yaml")
    line, over = gpu_memory_plan(card, QWEN3_1_7B, QWEN3_4B, total_gib=79.2)
    assert over == [] and "vLLM 40 GiB" in line and "(vLLM asleep)" in line
    greedy = load_config("configs/qwen3-1.7b-opd-dapo.yaml", ["generate.gpu_memory_utilization=0.9"])
    assert gpu_memory_plan(greedy, QWEN3_1_7B, QWEN3_4B, total_gib=79.2)[1][0].startswith("sampling and scoring")
