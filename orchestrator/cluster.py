"""The Dask cluster of a resident run: an embedded one on this machine, or the scheduler at `cluster.address`.

Roles are placed with Dask worker resources: `generate` and `score` (any number of workers each;
one shard at a time per worker), and `train-rank-<r>` (the worker that keeps data-parallel rank r's
DeepSpeed engine). The embedded cluster has `cluster.workers` worker processes, each with every
role but training, which workers 0..train.processes-1 take one rank each. On a real cluster, start
each worker with the resources of its roles, one thread per worker, e.g. one worker per GPU:

    dask scheduler
    CUDA_VISIBLE_DEVICES=0 dask worker tcp://head:8786 --nthreads 1 --resources "generate=1,score=1,train-rank-0=1"
    CUDA_VISIBLE_DEVICES=1 dask worker tcp://head:8786 --nthreads 1 --resources "generate=1,score=1,train-rank-1=1"

Worker processes are not daemons (vLLM's EngineCore and the verifier's pool start processes of
their own), keep torch's thread count (Dask would set OMP_NUM_THREADS=1: other fp32 rounding than a
stage process), and a worker that has lost its task retries nothing: a killed worker fails the
stage, and the next `make iterate` resumes at the first unsealed output (docs/reliability.md).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from distributed import Client, Nanny, Scheduler, SpecCluster

from common.config import Config, ConfigError
from orchestrator.roles import GENERATE, SCORE, Roles, close_roles, train_role


def embedded_workers(config: Config) -> dict:
    count = max(config.cluster.workers, config.train.processes)
    return {index: {"cls": Nanny, "options": {
        "nthreads": 1, "host": "127.0.0.1", "silence_logs": logging.ERROR,
        "resources": {GENERATE: 1, SCORE: 1, **({train_role(index): 1} if index < config.train.processes else {})},
    }} for index in range(count)}


def check_roles(client: Client, config: Config) -> None:
    """Every role has a worker: one line naming what is missing otherwise."""
    held = [info.get("resources", {}) for info in client.scheduler_info()["workers"].values()]
    needed = [GENERATE, SCORE, *(train_role(rank) for rank in range(config.train.processes))]
    missing = [role for role in needed if not any(role in resources for resources in held)]
    if missing:
        raise ConfigError(f"config key 'cluster.address': no worker of {config.cluster.address} has the resource(s) "
                          f"{', '.join(missing)} (fix: start workers with --resources, see orchestrator/cluster.py)")


@contextmanager
def open_cluster(config: Config) -> Iterator[Client]:
    """A client whose every worker carries the Roles plugin; the cluster's workers close with it."""
    import dask

    settings = {
        "distributed.worker.daemon": False,
        # Dask's defaults here set OMP_NUM_THREADS=1 (other fp32 rounding than a stage process) and
        # MALLOC_TRIM_THRESHOLD_=64 kB, which hands torch's freed tensors back to the kernel only to
        # fault them in again: sampling ran 2.3x slower in a worker than in a process with it.
        "distributed.nanny.pre-spawn-environ": {},
        # The statistical profiler takes the GIL every 10 ms, from the Python loop of HF sampling too.
        "distributed.worker.profile.enabled": False,
        "distributed.scheduler.allowed-failures": 0,
        "distributed.worker.memory.terminate": False,  # a model resident in memory is the point
    }
    with dask.config.set(settings):
        if config.cluster.address:
            cluster, client = None, Client(config.cluster.address)
            controller = None  # on another machine: its workers outlive us by design
        else:
            cluster = SpecCluster(workers=embedded_workers(config), silence_logs=logging.ERROR, asynchronous=False,
                                  scheduler={"cls": Scheduler, "options": {"dashboard_address": None,
                                                                           "host": "127.0.0.1"}})
            client = Client(cluster)
            client.wait_for_workers(len(cluster.workers))
            controller = os.getpid()  # embedded workers exit when this process dies (a kill -9 included)
        try:
            check_roles(client, config)
            client.register_plugin(Roles(controller))
            yield client
        finally:
            try:
                client.run(close_roles)
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
