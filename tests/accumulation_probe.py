"""One mini-batch through real DeepSpeed engines, cut into one micro-batch and into several: the
gradient each engine holds before step() (read with DeepSpeed's own API) and its weights after.

    python tests/accumulation_probe.py OUT.json CASE [CASE ...]     CASE = stage[+offload][+ckpt][+pack][+bf16]

Run by tests/test_train.py in a fresh process (DeepSpeed's process group is per process). For each
case it writes: the relative L2 error of the gradient against a plain torch reference of the whole
mini-batch in one backward, for a single micro-batch and for each split (>= 4 micro-batches), the
relative error of the gradient norm DeepSpeed reports after step() (stages 1-3), and the relative L2
distance of the weights' update, split vs single.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.batching import micro_batches  # noqa: E402
from common.config import load_config  # noqa: E402
from common.modeling import load_model, response_logprobs  # noqa: E402
from stages.train.engine import PolicyLogprobs, init_distributed, open_engine  # noqa: E402
from stages.train.iteration import IterationData, minibatch_backward  # noqa: E402
from stages.train.loss import LossConfig  # noqa: E402

STUDENT = ROOT / "assets" / "tiny" / "student"
ROWS = 16
# (micro_batch_size, max_tokens_per_micro_batch): one micro-batch, then splits by count and by tokens.
SINGLE = (ROWS, 1_000_000)
SPLITS = {"4 rows": (4, 1_000_000), "token budget": (ROWS, 160)}


def batch(seed: int = 3) -> IterationData:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, 300) for _ in range(rng.randint(4, 24))] for _ in range(ROWS)]
    responses = [[rng.randrange(10, 300) for _ in range(rng.randint(8, 30))] for _ in range(ROWS)]
    data = IterationData(prompts, responses, teacher=[torch.tensor([rng.uniform(-4, 0) for _ in r]) for r in responses],
                         rollout=[torch.zeros(len(r)) for r in responses])
    with torch.no_grad():  # lp_old a little off the current policy, so the PPO clips are active
        old = response_logprobs(load_model(STUDENT), prompts, responses, 0, packed=False).sampled
    data.old = [o + torch.tensor([rng.uniform(-0.3, 0.3) for _ in o]) for o in old]
    return data


def overrides(case: str, micro: tuple[int, int]) -> list[str]:
    stage, *flags = case.split("+")
    values = [f"train.zero_stage={stage}", f"train.micro_batch_size={micro[0]}",
              f"train.max_tokens_per_micro_batch={micro[1]}", "train.lr=1e-3", "train.grad_clip=1e9"]
    if "offload" in flags:
        values += ["train.offload_optimizer=true"] + (["train.offload_params=true"] if stage == "3" else [])
    if "ckpt" in flags:
        values.append("train.gradient_checkpointing=true")
    values.append(f"train.packing={'true' if 'pack' in flags else 'false'}")
    return values


def reference_gradient(data: IterationData, normaliser: float) -> dict[str, torch.Tensor]:
    """The whole mini-batch in one backward of a plain torch model: no DeepSpeed, no accumulation."""

    class Plain:
        def __init__(self):
            self.module = PolicyLogprobs(load_model(STUDENT))
            self.module.train()

        def __call__(self, *inputs):
            return self.module(*inputs)

        def backward(self, loss, scale_wrt_gas=True):
            loss.backward()

    engine = Plain()
    config = load_config(ROOT / "configs" / "tiny.yaml", overrides("0", SINGLE)).train
    minibatch_backward(engine, data, list(range(ROWS)), normaliser, config, LossConfig(), 0, [0], "reference")
    return {name: p.grad.detach().clone() for name, p in engine.module.named_parameters()}


def run_engine(case: str, micro: tuple[int, int], data: IterationData, normaliser: float):
    """(full gradient before step(), weights after it) of one DeepSpeed engine over the mini-batch."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    config = load_config(ROOT / "configs" / "tiny.yaml", overrides(case, micro))
    engine = open_engine(config, STUDENT, bf16="bf16" in case.split("+"))
    dtypes = [str(dtype).removeprefix("torch.") for dtype in engine.get_data_types()]  # (model, accumulation)
    rows = list(range(ROWS))
    splits = len(micro_batches(rows, data.tokens(), micro[1], micro[0]))
    minibatch_backward(engine, data, rows, normaliser, config.train, LossConfig(), 0, [0], case)
    # ZeRO-2 without managed accumulation assembles its gradient partitions only inside step(), and with
    # the optimizer offloaded they sit in CPU buffers that safe_get_full_grad does not read (it returns
    # zeros): before step() DeepSpeed has no gradient to show, so its norm after step() is checked instead.
    hidden = config.train.zero_stage == 2 or config.train.offload_optimizer
    grads = None if hidden else {
        name: safe_get_full_grad(p).detach().float().cpu().clone() for name, p in engine.module.named_parameters()}
    engine.step()
    norm = engine.get_global_grad_norm()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        weights = {name: p.detach().float().cpu().clone() for name, p in engine.module.named_parameters()}
    engine.destroy()
    return grads, None if norm is None else float(norm), weights, splits, dtypes


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    difference = sum(((a[n] - b[n]).double() ** 2).sum() for n in b) ** 0.5
    return float(difference / sum((b[n].double() ** 2).sum() for n in b) ** 0.5)


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    init_distributed()
    torch.manual_seed(0)
    data = batch()
    normaliser = sum(map(len, data.responses))
    reference = reference_gradient(data, normaliser)
    initial = {name: p.detach().clone() for name, p in PolicyLogprobs(load_model(STUDENT)).named_parameters()}
    reference_norm = float(sum((g.double() ** 2).sum() for g in reference.values()) ** 0.5)
    results = {}

    def errors(grads, norm) -> dict:
        return {"gradient_error": None if grads is None else relative(grads, reference),
                "norm_error": None if norm is None else abs(norm - reference_norm) / reference_norm}

    for case in cases:
        grads, norm, weights, _, dtypes = run_engine(case, SINGLE, data, normaliser)
        entry = {"single": errors(grads, norm), "splits": {}, "dtypes": dtypes}
        update = {n: weights[n] - initial[n] for n in initial}
        for name, micro in SPLITS.items():
            split_grads, split_norm, split_weights, count, _ = run_engine(case, micro, data, normaliser)
            entry["splits"][name] = {
                "micro_batches": count, **errors(split_grads, split_norm),
                "weights_vs_single": relative({n: split_weights[n] - initial[n] for n in initial}, update),
            }
        results[case] = entry
        print(case, json.dumps(entry), flush=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
