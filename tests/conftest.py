import os

import pytest
from pipeline_helpers import ROOT, orchestrate

# Tests name the repository's assets and configs by relative paths, as a user at its root would: the same
# from any working directory pytest is started in (the stage processes they start inherit it).
os.chdir(ROOT)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """Two uninterrupted tiny iterations by stage processes (run as 1 + 1: a second call continues the
    run); the resident runs of other tests must write the same bytes."""
    run = tmp_path_factory.mktemp("runs") / "reference"
    first = orchestrate(run, 1, "-o", "orchestrator.mode=subprocess")
    assert first.returncode == 0, first.stderr[-3000:]
    second = orchestrate(run, 1, "-o", "orchestrator.mode=subprocess")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 iteration(s) done" in second.stdout
    # What the two calls printed, for the tests of the terminal output.
    (run.parent / "reference.out").write_text(first.stdout + second.stdout)
    (run.parent / "reference.err").write_text(first.stderr + second.stderr)
    return run
