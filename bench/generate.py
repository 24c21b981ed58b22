"""Generation benchmark (`make bench-generate`): the HF engine against vLLM, and what resident mode saves.

    python -m bench.generate [--repeats 3]

On the tiny world (64 prompts x 4 samples, up to 64 new tokens, temperature 1, the default config):
  * tokens/s of each engine over the same prompts, median of --repeats passes; one engine at a time
    (a live vLLM engine keeps its EngineCore busy, which would slow the HF passes beside it);
  * the per-iteration engine overhead of each orchestrator mode: subprocess mode pays a fresh
    process that imports the stack and opens the engine on v_i (timed as that process's wall time);
    resident mode pays `load_policy(v_i)` on the loaded engine (timed in process).
On a GPU it also times the HF engine on the Qwen3-1.7B shape (random weights, 256 sequences x 512
new tokens), against the 4,200 tokens/s of plain transformers `generate` (docs/design.md, "Reference figures"; goal >= 2x).
Results go to bench/results/generate.json; vLLM rows are skipped when vLLM is not installed.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.record import write_results
from common.config import load_config
from common.data import load_prompts
from common.modeling import load_tokenizer
from common.vllm import vllm_available
from stages.generate.engines import open_engine
from stages.generate.sampling import SamplingParams

STUDENT, OTHER = Path("assets/tiny/student"), Path("assets/tiny/teacher")  # same architecture
OPEN_AND_CLOSE = ("from pathlib import Path\nfrom common.config import load_config\n"
                  "from stages.generate.engines import open_engine\n"
                  "if __name__ == '__main__':\n"
                  "    open_engine(load_config('configs/tiny.yaml', {overrides!r}), Path('{checkpoint}')).close()\n")


def fresh_process_seconds(overrides: list[str]) -> float:
    """Wall time of a new Python process that opens the engine on a checkpoint and exits."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", OPEN_AND_CLOSE.format(overrides=overrides, checkpoint=STUDENT)],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def tiny_world_prompts(config, count: int = 64) -> list[list[int]]:
    """The first `count` training prompts of the tiny world, as token ids (shared with bench/score.py)."""
    return [p.prompt_ids for p in load_prompts(config.data.train, load_tokenizer(STUDENT),
                                               config.data.max_prompt_tokens, False).prompts[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config("configs/tiny.yaml")
    prompts = tiny_world_prompts(config)
    params = SamplingParams(n=4, max_new_tokens=config.generate.max_response_tokens, seed=0,
                            batch_size=config.generate.batch_size)
    rows = []
    for name in ["hf"] + (["vllm"] if vllm_available() else []):
        engine = open_engine(load_config("configs/tiny.yaml", [f"generate.engine={name}"]), STUDENT)
        engine.sample(prompts[:8], params)  # warm-up
        rates = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            samples = engine.sample(prompts, params)
            rates.append(sum(len(s.response_ids) for s in samples) / (time.perf_counter() - started))
        reloads = []
        for checkpoint in (OTHER, STUDENT) * 2:
            started = time.perf_counter()
            engine.load_policy(checkpoint)
            reloads.append(time.perf_counter() - started)
        engine.close()
        fresh = [fresh_process_seconds([f"generate.engine={name}"]) for _ in range(2)]
        print(f"{name}: {statistics.median(rates):,.0f} tokens/s (passes: {[round(r) for r in rates]}); per-iteration "
              f"overhead: subprocess {statistics.median(fresh):.2f}s, resident {statistics.median(reloads):.3f}s",
              flush=True)
        rows += [{"metric": f"tiny world: {name} engine tokens/s (64 x 4, 64 new tokens)",
                  "value": round(statistics.median(rates)), "unit": "tokens/s", "goal": "", "met": None},
                 {"metric": f"{name} engine, per-iteration overhead, subprocess mode (fresh process + open)",
                  "value": round(statistics.median(fresh), 2), "unit": "s", "goal": "", "met": None},
                 {"metric": f"{name} engine, per-iteration overhead, resident mode (load_policy)",
                  "value": round(statistics.median(reloads), 3), "unit": "s", "goal": "", "met": None}]
    if torch.cuda.is_available():
        rows.append(gpu_hf_generation())
    write_results("generate", "make bench-generate", rows)


def gpu_hf_generation() -> dict:
    """The HF engine on the 1.7B shape: 64 prompts of 128 tokens x 4 samples, 512 new tokens."""
    from bench.gpu_check import VOCAB, build
    from stages.generate.hf_engine import sample

    model = build("1.7B").eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (128,), generator=g).tolist() for _ in range(64)]
    params = SamplingParams(n=4, max_new_tokens=512, temperature=1.0, seed=0, batch_size=256)
    sample(model, prompts[:4], SamplingParams(n=1, max_new_tokens=16), eos_ids=[VOCAB - 1], pad_id=0)  # compile
    torch.cuda.synchronize()
    started = time.perf_counter()
    samples = sample(model, prompts, params, eos_ids=[VOCAB - 1], pad_id=0)
    torch.cuda.synchronize()
    rate = sum(len(s.response_ids) for s in samples) / (time.perf_counter() - started)
    return {"metric": f"{torch.cuda.get_device_name()}: HF engine, 1.7B shape, 256 x 512 new tokens",
            "value": round(rate), "unit": "tokens/s", "goal": ">= 8,400 (2x plain generate)", "met": rate >= 8400}


if __name__ == "__main__":
    main()
