"""Every refusal the pipeline raises, in one torch-free module: the stage processes and the controller
catch them by class and print one line, `error: <what> (fix: <how>)`."""
from __future__ import annotations


class PipelineError(RuntimeError):
    """A refusal the user can act on (the message says what, and where it can, how to fix it)."""


class ConfigError(PipelineError, ValueError):
    """A configuration problem; the message names the offending key."""


class ContractError(PipelineError):
    """A stage input or output breaks the shard contract (missing, altered, stale or malformed)."""


class StalePolicyError(PipelineError):
    """Rows sampled by another policy than the one being trained (strict on-policy)."""


class NonFiniteError(PipelineError):
    """A non-finite loss or gradient: the iteration stops before any checkpoint is written."""


class WeightSyncError(PipelineError):
    """A generation engine's log-probs on the probe differ from the trainer's beyond the tolerance."""


class StageFailed(PipelineError):
    """A stage (process or worker task) failed; the controller stops the loop."""


class UserError(PipelineError):
    """A mistake in a command's arguments (RUN, ITER, RUNS ...)."""

    def __init__(self, message: str, fix: str):
        super().__init__(f"{message} (fix: {fix})")
