"""Resident roles: what a Dask worker keeps loaded across iterations, and the tasks the controller sends it.

Each worker carries the `Roles` plugin: a generation engine (pointed at each new policy in place, and
gated against the trainer's probe before it samples), a scorer for each teacher it serves, and, on the worker with a
`train-rank-<r>` resource, rank r's DeepSpeed engine with its optimizer state. The tasks below call
the stages' own shard functions with them, so a resident run writes exactly what stage processes
write. Tasks take the run folder and read the frozen config from it: a worker may have joined from
another machine.
"""
from __future__ import annotations

import copy
import socket
from dataclasses import replace
from pathlib import Path

from distributed import WorkerPlugin, get_worker

from common import shards
from common.config import Config, teacher_routes
from common.errors import ContractError
from common.run import RUN_CONFIG, exit_with_parent, load_run_config, quiet_libraries, set_threads
from common.shards import file_sha256, policy_version
from stages.generate.jobs import SampledShard, run_job
from stages.score.scoring import RolloutShard, ScoredShard, score_shard

NAME = "opd-roles"
GENERATE, SCORE = "generate", "score"


class Roles(WorkerPlugin):
    """Per worker: the models of its roles, opened on first use and kept."""
    name = NAME

    def __init__(self, controller_pid: int | None = None):
        self.controller_pid = controller_pid  # an embedded worker's parent: the controller (its nanny runs there)
        self.engine = None
        self.gate: dict[str, float] = {}  # the weight-sync gap of the policy the engine holds
        self.teachers = None  # stages/score/teacher.py: Teachers, each teacher this worker has served
        self.trainer = None

    def setup(self, worker) -> None:
        # Nothing heavy here (it runs on the worker's event loop): tasks call quiet_libraries().
        # An embedded worker whose controller died (kill -9) goes at once. Its own children (vLLM's
        # EngineCore, the verifier's workers) watch their parent the same way.
        if self.controller_pid is not None:
            exit_with_parent(self.controller_pid)

    def generation_engine(self, config: Config, checkpoint: Path):
        """The resident engine holding `checkpoint`: opened on first use, then reloaded in place;
        checked against the checkpoint's weight-sync probe whenever it takes a new policy."""
        from stages.generate.engines import open_engine
        from stages.generate.gate import check_weight_sync

        if self.engine is None:
            self.engine = open_engine(config, checkpoint)
            self.gate = check_weight_sync(self.engine, checkpoint)
        elif self.engine.checkpoint != Path(checkpoint):
            self.engine.load_policy(checkpoint)
            self.gate = check_weight_sync(self.engine, checkpoint)
        return self.engine

    def teacher_scorers(self, config: Config):
        """This worker's teachers (stages/score/teacher.py: Teachers): each opened on first use, kept."""
        from stages.score.teacher import Teachers

        if self.teachers is None:
            self.teachers = Teachers(config)
        return self.teachers

    def rank(self, config: Config, rank: int, world: int, address: str):
        from stages.train.stage import Trainer

        if self.trainer is None:
            self.trainer = Trainer(config, rank, world, address)
        return self.trainer

    def close(self) -> None:
        for model in (self.engine, self.teachers, self.trainer):
            if model is not None:
                model.close()
        self.engine = self.teachers = self.trainer = None

    def teardown(self, worker) -> None:
        self.close()


def roles() -> Roles:
    """The plugin of the worker running the calling task."""
    return get_worker().plugins[NAME]


def close_roles(dask_worker) -> None:
    """Run on every worker before the cluster stops: engines with processes of their own (vLLM's
    EngineCore) must shut down while their worker is alive, not be orphaned by its exit."""
    dask_worker.plugins[NAME].close()


_configs: dict[tuple, Config] = {}


def _config(run: Path) -> Config:
    """The run's frozen config, parsed and validated once per version of the file (every task reads it:
    milliseconds on the critical path), a fresh copy per task."""
    quiet_libraries()
    stat = (Path(run) / RUN_CONFIG).stat()
    key = (str(run), stat.st_mtime_ns, stat.st_size)
    if key not in _configs:
        _configs.clear()
        _configs[key] = load_run_config(run)
    config = copy.deepcopy(_configs[key])
    set_threads(config)
    return config


# ---- tasks ------------------------------------------------------------------------------------

def sample_task(run: Path, iteration: int, job) -> SampledShard:
    """One generate-stage shard (rollouts or eval) on this worker's engine, holding v_i."""
    config = _config(run)
    checkpoint = shards.checkpoint_dir(run, iteration)
    mine = roles()
    engine = mine.generation_engine(config, checkpoint)
    return replace(run_job(config, run, iteration, job, engine, policy_version(checkpoint)), gate=mine.gate,
                   worker=get_worker().address)


def open_models_task(run: Path, iteration: int, generate: bool, score: bool) -> None:
    """Open what this worker's sampling and scoring need at v_i while the controller is still starting
    (MLflow, the prompt sets), so the first iteration pays for none of it: the generation engine
    (gated), the teachers and the verifier's workers (eval grades on generation workers too)."""
    from common.verifier import start as start_verifier

    config = _config(run)
    mine = roles()
    if generate:
        mine.generation_engine(config, shards.checkpoint_dir(run, iteration))
    if score:
        for model in dict.fromkeys(teacher_routes(config).values()):
            mine.teacher_scorers(config)(model)
    start_verifier(config.score.verifier_workers)


def open_rank_task(run: Path, iteration: int, rank: int, world: int, address: str) -> None:
    """Rank `rank`'s trainer on v_i (verified), opened at start; every rank at once (they meet at `address`),
    and only once every worker's other models are open, so no rank waits at the rendezvous for a load
    that failed."""
    config = _config(run)
    roles().rank(config, rank, world, address).open_at(shards.checkpoint_dir(run, iteration))


def score_task(run: Path, iteration: int, rollout: RolloutShard | SampledShard, versions: dict[str, str]
               ) -> ScoredShard:
    """One scored shard from the rollout shard a sample task wrote (checked against its sha256), each
    row by its data_source's teacher, all of them kept loaded on this worker."""
    config = _config(run)
    path = shards.stage_dir(run, iteration, "rollouts") / rollout.file
    if not path.exists() or file_sha256(path) != rollout.sha256:
        raise ContractError(f"{path} is not the rollout shard that was sampled (missing or altered)")
    return replace(score_shard(config, run, iteration, path, roles().teacher_scorers(config), versions),
                   worker=get_worker().address)


def train_task(run: Path, iteration: int, rank: int, world: int, address: str):
    """Rank `rank` of iteration i's steps and v_{i+1}'s policy on this worker's resident trainer;
    rank 0 returns its PolicyWritten (stages/train/records.py)."""
    from stages.train.stage import train_policy

    config = _config(run)
    mine = roles()
    if mine.engine is not None:  # a generation engine beside this rank frees its GPU memory (a no-op on a CPU)
        mine.engine.sleep()
    return train_policy(config, run, iteration, mine.rank(config, rank, world, address))


def optimizer_state_task(run: Path, iteration: int, rank: int, policy_files: dict | None):
    """Rank `rank` writes v_{i+1}'s optimizer state from its trainer (rank 0 then seals DONE and returns
    the StateWritten). The task secedes from the worker's one task slot first, so the worker samples
    and scores iteration i+1 meanwhile: the write is off the critical path. The trainer's lock keeps
    the engine from stepping or closing until it is done."""
    from distributed import secede

    from stages.train.stage import write_optimizer_state

    secede()
    config = _config(run)
    return write_optimizer_state(config, run, iteration, roles().trainer, policy_files)


def rendezvous_address(*after) -> str:
    """host:port for the trainers' process group, on the worker of rank 0 (once the tasks `after` are done,
    so the port is free when the ranks bind it, moments later)."""
    host = get_worker().address.split("://")[-1].rsplit(":", 1)[0]
    with socket.socket() as probe:
        probe.bind((host, 0))
        return f"{host}:{probe.getsockname()[1]}"
