"""Can the weight-sync gate tell v_i from v_{i+1} after one iteration at the card's lr of 1e-6?

    python -m rehearsal.gate_gap [--run runs/rehearse] [--iteration 1]

On a run's checkpoints (the rehearsal's: real widths, 2 layers, ZeRO-3 with offload, lr 1e-6), an HF
engine holding v_i is checked against v_{i+1}'s probe, in fp32 (this CPU's dtype) and in bf16 (the
GPU's): the probe's mean gap against the gate's tolerance, and whether the weight checksums see it.
A one-off measurement for docs/engines.md; the default suite tests the same on the tiny world.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import shards
from common.libraries import quiet_libraries
from common.modeling import load_model, load_tokenizer, response_logprobs
from common.weights import checksums, model_tensors
from stages.generate.gate import TOLERANCE


def probe_gap(model: torch.nn.Module, probe: shards.Probe, pad_id: int) -> float:
    with torch.no_grad():
        ours = response_logprobs(model, probe.prompts, probe.responses, pad_id, packed=False).sampled
    gaps = [abs(a - b) for row, theirs in zip(ours, probe.logprobs) for a, b in zip(row.float().tolist(), theirs)]
    return sum(gaps) / len(gaps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rehearsal.gate_gap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/rehearse"))
    parser.add_argument("--iteration", type=int, default=1, help="compare v_i with v_{i+1} (default: %(default)s)")
    args = parser.parse_args(argv)
    quiet_libraries()
    old, new = shards.checkpoint_dir(args.run, args.iteration), shards.checkpoint_dir(args.run, args.iteration + 1)
    probe, pad_id = shards.read_probe(new), load_tokenizer(new).pad_token_id
    results = {"old": old.name, "new": new.name}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        stale, fresh = load_model(old, dtype), load_model(new, dtype)
        differ = sum(a != b for a, b in zip(checksums(model_tensors(stale)).values(),
                                            checksums(model_tensors(fresh)).values()))
        results[name] = {"stale_gap": probe_gap(stale, probe, pad_id), "fresh_gap": probe_gap(fresh, probe, pad_id),
                         "tolerance": TOLERANCE[name], "tensors_that_differ": differ,
                         "tensors": len(model_tensors(fresh))}
        results[name]["probe_sees_it"] = results[name]["stale_gap"] > results[name]["tolerance"]
        print(json.dumps({name: results[name]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
