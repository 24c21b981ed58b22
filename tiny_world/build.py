"""Build the tiny world from nothing: task splits, tokenizer, teacher, and student.

    python -m tiny_world.build --out assets/tiny

Teacher and student come from one supervised run on the worked solutions (same lineage, so they
share the solution pattern, which on-policy distillation needs): the teacher is its last
checkpoint, the student an earlier one that already writes the format but still makes mistakes.
Everything is seeded; the same seed gives the same accuracies within a point.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from common.data import render_prompt
from common.shards import file_sha256
from common.verifier import grade_batch
from stages.generate.hf_engine import sample
from stages.generate.sampling import SamplingParams
from tiny_world.task import make_pairs, question, to_table, worked_solution
from tiny_world.tokenizer import train_tokenizer


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    n_train: int = 20000
    n_eval: int = 500
    max_digits: int = 3
    vocab_size: int = 400
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    probe_every: int = 20
    probe_prompts: int = 200
    # The student is the last probed checkpoint whose sampled accuracy is at most this and that
    # boxes an answer at least `student_min_boxed` of the time.
    student_max_sampled: float = 0.30
    student_min_boxed: float = 0.95


def build_model(config: BuildConfig, tokenizer) -> Qwen3ForCausalLM:
    model_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.hidden_size // config.heads,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return Qwen3ForCausalLM(model_config)


def sft_examples(pairs, tokenizer) -> list[tuple[list[int], list[int]]]:
    examples = []
    for a, b in pairs:
        prompt = render_prompt(tokenizer, [{"role": "user", "content": question(a, b)}], enable_thinking=False)
        response = tokenizer(worked_solution(a, b) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        examples.append((prompt, response))
    return examples


def sft_batch(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(examples):
        ids = prompt + response
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(response)
        attention_mask[row, : len(ids)] = 1
    return input_ids, labels, attention_mask


def accuracy(model, tokenizer, prompts, golds, temperature: float, seed: int) -> tuple[float, float]:
    """(exact-answer accuracy, fraction of responses with a complete \\boxed{}) over `prompts`."""
    params = SamplingParams(n=1, max_new_tokens=64, temperature=temperature, seed=seed)
    samples = sample(model, prompts, params, eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    grades = grade_batch([(tokenizer.decode(s.response_ids, skip_special_tokens=True), golds[s.prompt_index])
                          for s in samples])
    return (sum(g.correct for g in grades) / len(grades),
            sum(g.status != "no_answer" for g in grades) / len(grades))


def train(config: BuildConfig, model, tokenizer, examples, probe_prompts, probe_golds):
    """Supervised run on the worked solutions; returns the final model and the chosen student."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps)
                                                 * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)))
    rng = random.Random(config.seed)
    order: list[int] = []
    student, student_probe, history = None, None, []
    started = time.time()
    for step in range(1, config.steps + 1):
        if len(order) < config.batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[: config.batch_size], order[config.batch_size :]
        input_ids, labels, attention_mask = sft_batch([examples[k] for k in batch], tokenizer.pad_token_id)
        model.train()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % config.probe_every == 0:
            model.eval()
            sampled, boxed = accuracy(model, tokenizer, probe_prompts, probe_golds, 1.0, config.seed)
            probe = {"step": step, "loss": round(loss.item(), 4), "sampled": sampled, "boxed": boxed,
                     "seconds": round(time.time() - started, 1)}
            print(json.dumps(probe), flush=True)
            del probe["seconds"]  # build.json stays byte-identical across rebuilds
            history.append(probe)
            if sampled <= config.student_max_sampled and boxed >= config.student_min_boxed:
                student, student_probe = copy.deepcopy(model), probe
    return model, student, student_probe, history


def save_model(model, tokenizer, out_dir: Path) -> None:
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("assets/tiny"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=BuildConfig.steps)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = BuildConfig(seed=args.seed, steps=args.steps)
    out = args.out
    (out / "data").mkdir(parents=True, exist_ok=True)

    train_pairs, eval_pairs = make_pairs(config.seed, config.n_train, config.n_eval, config.max_digits)
    pq.write_table(to_table(train_pairs, "train"), out / "data" / "train.parquet")
    pq.write_table(to_table(eval_pairs, "eval"), out / "data" / "eval.parquet")

    chat_samples = [f"<|im_start|>user\n{question(a, b)}<|im_end|>\n<|im_start|>assistant\n" for a, b in train_pairs]
    corpus = chat_samples + [worked_solution(a, b) for a, b in train_pairs]
    tokenizer = train_tokenizer(corpus, config.vocab_size, out / "tokenizer")

    examples = sft_examples(train_pairs, tokenizer)
    probe_pairs = eval_pairs[: config.probe_prompts]
    probe_prompts = [render_prompt(tokenizer, [{"role": "user", "content": question(a, b)}], False) for a, b in probe_pairs]
    probe_golds = [str(a + b) for a, b in probe_pairs]
    model = build_model(config, tokenizer)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}", flush=True)
    teacher, student, student_probe, history = train(config, model, tokenizer, examples, probe_prompts, probe_golds)
    if student is None:
        raise SystemExit("no checkpoint met the student criteria; lower probe_every or adjust the thresholds")
    save_model(teacher, tokenizer, out / "teacher")
    save_model(student, tokenizer, out / "student")
    (out / "build.json").write_text(json.dumps({"config": config.__dict__, "student_checkpoint": student_probe,
                                                "probes": history}, indent=1) + "\n")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    (out / "SHA256SUMS").write_text("".join(f"{file_sha256(p)}  {p.relative_to(out)}\n" for p in files))


if __name__ == "__main__":
    main()
