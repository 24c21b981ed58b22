"""Dask for the pipeline: a client on an embedded LocalCluster or an existing scheduler, and the
worker plugin that keeps models resident in each worker.

Subprocess mode: `python -m stages.score` opens an in-process LocalCluster (one worker thread; no
process start-up) and maps over rollout shards; the teacher is loaded once per stage.
Resident mode (`orchestrator.mode: resident`): the orchestrator opens a LocalCluster of worker
processes once per `iterate`; generation and teacher engines load once per worker and stay loaded
across iterations, each iteration pointing the generation engine at the new policy in place.
With `cluster.address`, both modes join that scheduler instead (its workers must run this code).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from distributed import Client, LocalCluster, WorkerPlugin, get_worker

from common.config import Config

PLUGIN = "opd-resident-models"


class ResidentModels(WorkerPlugin):
    """Per worker: one generation engine and one teacher scorer, opened on first use, kept after."""
    name = PLUGIN

    def __init__(self):
        self.generation = None
        self.scorer = None
        self.scorer_key = None

    def setup(self, worker) -> None:
        from common.run import quiet_libraries

        quiet_libraries()

    def generation_engine(self, config: Config, checkpoint: Path):
        """The resident engine pointed at `checkpoint` (opened on first use, reloaded in place after)."""
        from stages.generate.sampling import open_engine

        if self.generation is None:
            self.generation = open_engine(config, checkpoint)
        elif self.generation.checkpoint != Path(checkpoint):
            self.generation.load_policy(checkpoint)
        return self.generation

    def teacher(self, config: Config, teacher_dir: Path):
        from stages.score.teacher import open_scorer

        key = (str(teacher_dir), config.score)
        if self.scorer is None or self.scorer_key != key:
            if self.scorer is not None:
                self.scorer.close()
            self.scorer, self.scorer_key = open_scorer(config, teacher_dir), key
        return self.scorer

    def close(self) -> None:
        for model in (self.generation, self.scorer):
            if model is not None:
                model.close()
        self.generation = self.scorer = None

    def teardown(self, worker) -> None:
        self.close()


def close_resident_models(dask_worker) -> None:
    """Run on every worker before the cluster stops: engines with processes of their own (vLLM's
    EngineCore) must shut down while their worker is alive, not be orphaned by its exit."""
    dask_worker.plugins[PLUGIN].close()


def resident_models() -> ResidentModels:
    """The plugin of the worker running the calling task."""
    return get_worker().plugins[PLUGIN]


@contextmanager
def open_client(config: Config, processes: bool) -> Iterator[Client]:
    """A client with the ResidentModels plugin on every worker.

    `processes=False` runs one worker thread in this process (a stage's own embedded cluster);
    `processes=True` starts `cluster.workers` worker processes (resident mode). Worker processes are
    not daemons, so vLLM's EngineCore and the verifier's pool can start processes of their own, and
    they keep torch's thread count (Dask sets OMP_NUM_THREADS=1 by default): with the same threads as
    a stage process, a resident worker computes bit for bit what that process would.
    """
    import dask

    c = config.cluster
    with dask.config.set({"distributed.worker.daemon": False,
                          "distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536}}):
        if c.address:
            client = Client(c.address)
            cluster = None
        else:
            local = {"host": "127.0.0.1"} if processes else {}  # in-process clusters talk over inproc://
            cluster = LocalCluster(n_workers=c.workers if processes else 1, threads_per_worker=1,
                                   processes=processes, dashboard_address=None, **local)
            client = Client(cluster)
        try:
            client.register_plugin(ResidentModels())
            yield client
        finally:
            client.run(close_resident_models)
            client.close()
            if cluster is not None:
                cluster.close()
