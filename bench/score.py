"""Teacher-scoring benchmark (`make bench-score`): the HF and vLLM scorers on the tiny world.

    python -m bench.score [--repeats 3]

Scores the same 256 tiny-world sequences (64 prompts x 4 samples from the student) with each
scorer, median tokens/s (prompt + response tokens through the teacher) over --repeats passes,
alternating. On a GPU it also times the HF scorer on the Qwen3-4B shape (random weights, 8 x 8192
tokens: 1024 prompt + 7168 response) with its MFU and peak memory; a plain forward reached 44% MFU
on an H200 (docs/design.md, "Reference figures"), the goal is >= 55%. Results go to bench/results/score.json.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.generate import tiny_world_prompts
from bench.record import write_results
from common.config import load_config
from common.vllm import vllm_available
from stages.generate.engines import open_engine
from stages.generate.sampling import SamplingParams
from stages.score.teacher import open_scorer

STUDENT, TEACHER = Path("assets/tiny/student"), Path("assets/tiny/teacher")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config("configs/tiny.yaml")
    prompts = tiny_world_prompts(config)
    engine = open_engine(config, STUDENT)
    samples = engine.sample(prompts, SamplingParams(n=4, max_new_tokens=config.generate.max_response_tokens))
    columns = {"prompt_ids": [prompts[s.prompt_index] for s in samples],
               "response_ids": [s.response_ids for s in samples]}
    tokens = sum(map(len, columns["prompt_ids"])) + sum(map(len, columns["response_ids"]))
    scorers = {name: open_scorer(load_config("configs/tiny.yaml", [f"score.engine={name}"]), TEACHER)
               for name in ("hf", "vllm") if name == "hf" or vllm_available()}
    rates: dict[str, list[float]] = {name: [] for name in scorers}
    for scorer in scorers.values():
        scorer.score({k: v[:8] for k, v in columns.items()})  # warm-up
    for _ in range(args.repeats):
        for name, scorer in scorers.items():
            started = time.perf_counter()
            scorer.score(columns)
            rates[name].append(tokens / (time.perf_counter() - started))
    rows = []
    for name, values in rates.items():
        print(f"{name}: {statistics.median(values):,.0f} tokens/s (passes: {[round(v) for v in values]})", flush=True)
        rows.append({"metric": f"tiny world: {name} scorer tokens/s (256 sequences, {tokens:,} tokens)",
                     "value": round(statistics.median(values)), "unit": "tokens/s", "goal": "", "met": None})
        scorers[name].close()
    if torch.cuda.is_available():
        rows += gpu_hf_scoring()
    write_results("score", "make bench-score", rows)


def gpu_hf_scoring() -> list[dict]:
    from bench.gpu_check import VOCAB, build, params, timed
    from common.modeling import response_logprobs

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192**3 / statistics.median(timed(lambda: a @ a, 10)[3:])
    a = None  # frees GPU memory (`del` would leave the closure above a dangling name)
    teacher = build("4B").eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (1024,), generator=g).tolist() for _ in range(8)]
    responses = [torch.randint(0, VOCAB, (7168,), generator=g).tolist() for _ in range(8)]
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        seconds = statistics.median(timed(lambda: response_logprobs(teacher, prompts, responses, 0, 4096,
                                                                    packed=False), 4)[1:])
    mfu = 2 * params(teacher) * 8 * 8192 / seconds / peak
    gpu = torch.cuda.get_device_name()
    return [{"metric": f"{gpu}: HF scorer, 4B shape, 8 x 8192 tokens", "value": round(8 * 8192 / seconds),
             "unit": "tokens/s", "goal": "", "met": None},
            {"metric": f"{gpu}: HF scorer MFU (2N FLOPs/token vs measured bf16 matmul peak)",
             "value": round(mfu, 3), "unit": "fraction", "goal": ">= 0.55", "met": mfu >= 0.55},
            {"metric": f"{gpu}: HF scorer peak memory", "value": round(torch.cuda.max_memory_allocated() / 2**30, 1),
             "unit": "GiB", "goal": "", "met": None}]


if __name__ == "__main__":
    main()
