"""GPU check of the pipeline's own code paths at the card's model shapes (random weights, bf16).

    PYTHONUNBUFFERED=1 python bench/gpu_check.py

Times, on one GPU: the HF sampling engine (stages/generate/hf_engine.py) on the 1.7B shape, the
teacher scorer's chunked log-prob gather (common/modeling.py) on the 4B shape, and one training
step of the card's loss (stages/train/loss.py) on the 1.7B shape with gradient checkpointing.
MFU counts 2N FLOPs per token forward, 6N per training token (8N with checkpointing), N including
embeddings, attention FLOPs not counted, against the measured bf16 matmul ceiling (../shared/DESIGN.md §9).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.modeling import response_logprobs  # noqa: E402
from stages.generate.hf_engine import sample  # noqa: E402
from stages.generate.sampling import SamplingParams  # noqa: E402
from stages.train.loss import TokenBatch, distillation_loss  # noqa: E402

VOCAB = 151_936
SHAPES = {
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}


def build(shape: str) -> torch.nn.Module:
    config = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=1e6, **SHAPES[shape])
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul = timed(lambda: a @ a, 10)[3:]
    peak = 2 * 8192**3 / statistics.median(matmul)
    results["bf16_matmul_tflops"] = round(peak / 1e12, 1)
    a = None  # frees GPU memory (`del` would leave the closure above a dangling name)
    print(json.dumps(results), flush=True)

    # Teacher scoring: 8 sequences x 4096 tokens (512 prompt + 3584 response) through the chunked gather.
    teacher = build("4B").eval()
    n_teacher = params(teacher)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (512,), generator=g).tolist() for _ in range(8)]
    responses = [torch.randint(0, VOCAB, (3584,), generator=g).tolist() for _ in range(8)]
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        def forward():
            return response_logprobs(teacher, prompts, responses, pad_id=0, chunk_tokens=4096, packed=False)

        times = timed(forward, 4)[1:]
    tokens = 8 * 4096
    results["score_4B_8x4096"] = {
        "tokens_per_s": round(tokens / statistics.median(times)), "params": n_teacher,
        "mfu": round(2 * n_teacher * tokens / statistics.median(times) / peak, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    print(json.dumps(results["score_4B_8x4096"]), flush=True)
    teacher = None  # frees GPU memory (`del` would leave the closure above a dangling name)
    torch.cuda.empty_cache()

    # Training step: the card's loss, 8192 response tokens per step as 2 micro-batches of 4 x 1024.
    student = build("1.7B")
    n_student = params(student)
    student.gradient_checkpointing_enable()
    student.config.use_cache = False
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, fused=True)
    prompts = [torch.randint(0, VOCAB, (256,), generator=g).tolist() for _ in range(8)]
    responses = [torch.randint(0, VOCAB, (1024,), generator=g).tolist() for _ in range(8)]
    teacher_lp = torch.full((4 * 1024,), -1.0, device="cuda")

    def step():
        for half in (slice(0, 4), slice(4, 8)):
            lp = torch.cat(response_logprobs(student, prompts[half], responses[half], pad_id=0, chunk_tokens=4096,
                                             packed=False).sampled)
            out = distillation_loss(TokenBatch(lp, lp.detach(), teacher_lp), normaliser=8192)
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    times = timed(step, 4)[1:]
    seq_tokens = 8 * (256 + 1024)
    results["train_1.7B_8x1280_gradckpt"] = {
        "sequence_tokens_per_s": round(seq_tokens / statistics.median(times)), "params": n_student,
        "mfu_8N": round(8 * n_student * seq_tokens / statistics.median(times) / peak, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    print(json.dumps(results["train_1.7B_8x1280_gradckpt"]), flush=True)
    optimizer = None  # frees GPU memory (`del` would leave the closure above a dangling name)
    student.gradient_checkpointing_disable()
    student.config.use_cache = True
    student.eval()
    torch.cuda.empty_cache()

    # Generation with the HF engine: 256 sequences, 512 new tokens, temperature 1 (random weights
    # rarely emit EOS, so every sequence runs to the limit).
    prompts = [torch.randint(0, VOCAB, (128,), generator=g).tolist() for _ in range(64)]
    params_ = SamplingParams(n=4, max_new_tokens=512, temperature=1.0, seed=0, batch_size=256)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    samples = sample(student, prompts, params_, eos_ids=[VOCAB - 1], pad_id=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new_tokens = sum(len(s.response_ids) for s in samples)
    results["generate_hf_1.7B_256x512"] = {
        "tokens_per_s": round(new_tokens / seconds), "new_tokens": new_tokens,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "finite_logprobs": all(torch.isfinite(torch.tensor(s.logprobs)).all().item() for s in samples)}
    print(json.dumps(results["generate_hf_1.7B_256x512"]), flush=True)
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
