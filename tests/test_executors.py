"""The local executor (common/executors.py): what `python -m stages.<stage>` and subprocess mode run
their tasks on. Real processes (spawned), tasks named by module and function."""
import pytest

from common import worker
from common.errors import ContractError, StageFailed
from common.executors import LocalExecutor, Task

TASKS = "executor_tasks"  # tests/executor_tasks.py, imported in the workers


def task(name: str) -> Task:
    return Task(TASKS, name)


def test_a_roles_tasks_share_one_process_and_the_next_stage_gets_fresh_ones():
    with LocalExecutor() as executor:
        first = executor.gather("generate", 0, [executor.submit(task("pid"), role="generate") for _ in range(3)])
        second = executor.gather("score", 0, [executor.submit(task("pid"), role="score")])
        ranks = executor.gather("train", 0, [executor.submit(task("pid"), role=f"train-rank-{r}") for r in range(2)])
        again = executor.gather("generate", 1, [executor.submit(task("pid"), role="generate")])
    assert len(set(first)) == 1 and len(set(ranks)) == 2
    assert len({first[0], second[0], *ranks, again[0]}) == 5  # nothing is held between stages


def test_a_task_given_a_handle_runs_on_its_result():
    with LocalExecutor() as executor:
        sampled = executor.submit(task("add"), 1, 2, role="generate")
        scored = executor.submit(task("add"), 10, sampled, role="score")
        assert executor.gather("score", 0, [scored]) == [13]
        assert executor.done([sampled, scored])


def test_tasks_run_when_gathered_and_what_they_kept_is_closed_with_their_process(tmp_path):
    marker = tmp_path / "closed"
    with LocalExecutor() as executor:
        kept = executor.submit(task("keep_a_file"), str(marker), role="train-rank-0")
        assert not executor.done([kept])  # queued: a local stage runs when its driver waits for it
        executor.gather("train", 0, [kept])
        assert not marker.exists()  # still open for the stage's next task
        executor.gather("generate", 1, [executor.submit(task("pid"), role="generate")])
        assert marker.exists()  # the train stage's process ended, closing what it kept


def test_a_refusal_is_one_line_naming_the_stage():
    with LocalExecutor() as executor, pytest.raises(StageFailed) as failed:
        executor.gather("score", 3, [executor.submit(task("refuse"), role="score")])
    assert str(failed.value) == ("stage score failed at iteration 3: the shard is altered "
                                 "(fix: rerun the same command to resume)")


def test_a_bug_keeps_the_workers_traceback():
    with LocalExecutor() as executor, pytest.raises(KeyError) as failed:
        executor.gather("score", 0, [executor.submit(task("crash"), role="score")])
    assert "executor_tasks.py" in str(failed.value.__cause__) and "crash" in str(failed.value.__cause__)


def test_a_killed_rank_stops_the_stage_and_its_waiting_peer():
    """Rank 0 dies (kill -9) while rank 1 waits for it forever: the stage fails with the exit code,
    and rank 1's process is killed rather than left waiting."""
    executor = LocalExecutor()
    ranks = [executor.submit(task("die"), role="train-rank-0"), executor.submit(task("wait_forever"), role="train-rank-1")]
    with pytest.raises(StageFailed, match="the train-rank-0 process died \\(exit code -9\\)"):
        executor.gather("train", 0, ranks)
    assert executor.workers == {}


def test_a_stage_process_that_started_the_verifiers_workers_ends_by_itself():
    """A multiprocessing child joins its live children before any atexit handler runs: the verifier's
    workers must be stopped with the process's models, or the stage would wait for it forever (the
    executor kills it after a while: exit code -9)."""
    with LocalExecutor() as executor:
        executor.gather("score", 0, [executor.submit(task("start_verifier"), role="score")])
        score = executor.workers["score"]
        executor.gather("generate", 0, [executor.submit(task("pid"), role="generate")])
    assert score.process.exitcode == 0


class Model:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def test_what_a_worker_keeps_opens_once_and_closes_when_the_worker_ends():
    opened = []

    def open_model():
        opened.append(Model())
        return opened[-1]

    first = worker.kept("a test model", open_model)
    assert worker.kept("a test model", open_model) is first and worker.kept("a test model") is first
    assert len(opened) == 1 and not first.closed
    worker.close_all()
    worker.close_all()  # a Dask plugin's teardown and the process's exit may both run the closers
    assert first.closed
    assert worker.kept("a test model", open_model) is not first and len(opened) == 2  # the next task opens anew
    with pytest.raises(ContractError, match="holds no trainer: the task that opens it did not run here"):
        worker.kept("trainer")
