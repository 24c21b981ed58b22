"""The train stage's refusals, in a module without torch: the resident controller catches them
(orchestrator/loop.py) without loading what the trainer runs on."""


class StalePolicyError(RuntimeError):
    """Rows sampled by another policy than the one being trained (strict on-policy)."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient: the iteration stops before any checkpoint is written."""
