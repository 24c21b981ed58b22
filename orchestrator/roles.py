"""Resident roles: the Dask plugin every worker of a resident run carries.

A worker keeps what its roles' tasks open (stages/*/tasks.py, through common/worker.py): the
generation engine of a `generate` worker, the teachers of a `score` worker, rank r's DeepSpeed
engine on a `train-rank-<r>` worker; the plugin names the worker for the shard summaries, ties an
embedded worker's life to the controller's and closes those models before the worker exits. It is
built in the controller, so it imports no model library.
"""
from __future__ import annotations

import socket

from distributed import WorkerPlugin, get_worker

from common import worker as this_worker
from common.run import exit_with_parent

NAME = "opd-roles"


class Roles(WorkerPlugin):
    name = NAME

    def __init__(self, controller_pid: int | None = None):
        self.controller_pid = controller_pid  # an embedded worker's parent: the controller (its nanny runs there)

    def setup(self, worker) -> None:  # Dask passes the worker by this name
        # Nothing heavy here (it runs on the worker's event loop). An embedded worker whose controller
        # died (kill -9) goes at once; its own children (vLLM's EngineCore, the verifier's workers)
        # watch their parent the same way.
        this_worker.NAME, this_worker.ON_DASK = worker.address, True
        if self.controller_pid is not None:
            exit_with_parent(self.controller_pid)

    def teardown(self, worker) -> None:
        this_worker.close_all()


def close_roles(dask_worker) -> None:
    """Run on every worker before the cluster stops: engines with processes of their own (vLLM's
    EngineCore) must shut down while their worker is alive, not be orphaned by its exit."""
    this_worker.close_all()


def rendezvous_address(*after) -> str:
    """host:port for the trainers' process group, on the worker of rank 0 (once the tasks `after` are done,
    so the port is free when the ranks bind it, moments later)."""
    host = get_worker().address.split("://")[-1].rsplit(":", 1)[0]
    with socket.socket() as probe:
        probe.bind((host, 0))
        return f"{host}:{probe.getsockname()[1]}"
