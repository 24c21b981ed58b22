"""Train stage: one iteration of on-policy distillation with DeepSpeed -> checkpoint v_{i+1}.

    python -m stages.train --run runs/tiny --iter 3

Starts from checkpoint v_i (and its optimizer state), refuses any scored row whose policy_version is
not v_i, recomputes lp_old without grad, then takes one optimizer step per mini-batch with the loss
of stages/train/loss.py, token-averaged over the whole mini-batch. Writes v_{i+1} as HF safetensors.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import time
from collections import defaultdict
from pathlib import Path

import torch

from common import shards
from common.config import Config, ConfigError
from common.modeling import load_model, load_tokenizer, policy_version, sequence_logprobs, weights_sha256
from common.progress import Progress, stage_summary
from common.run import fail, load_run_config, quiet_libraries, set_threads, stage_arguments
from stages.train.loss import LossConfig, k1_policy_gradient_loss

OPTIMIZER_STATE = "optimizer_state"


class StalePolicyError(RuntimeError):
    pass


def check_on_policy(table, version: str) -> None:
    """Strict on-policy guard: every row must have been sampled by exactly the policy being trained."""
    versions = set(table.column("policy_version").to_pylist())
    if versions != {version}:
        stale = sorted(versions - {version})
        raise StalePolicyError(f"refusing to train: rows sampled by {stale} but the trainer starts from {version}")


def init_distributed() -> None:
    import deepspeed

    if "RANK" not in os.environ:  # a single local process; the DeepSpeed launcher sets these itself
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def deepspeed_engine(config: Config, model: torch.nn.Module):
    import deepspeed

    t = config.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    warmup = max(t.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # We own accumulation: micro-batches vary in number, and step() is the mini-batch boundary.
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def minibatches(columns: dict, prompts_per_minibatch: int, seed: int) -> list[list[int]]:
    """Row indices of each mini-batch: whole prompt groups (all n responses), prompts shuffled."""
    groups: dict[str, list[int]] = defaultdict(list)
    for row, prompt_id in enumerate(columns["prompt_id"]):
        groups[prompt_id].append(row)
    prompt_ids = sorted(groups)
    random.Random(seed).shuffle(prompt_ids)
    return [[row for pid in prompt_ids[start : start + prompts_per_minibatch] for row in groups[pid]]
            for start in range(0, len(prompt_ids), prompts_per_minibatch)]


def train_iteration(config: Config, engine, columns: dict, pad_id: int, seed: int) -> dict:
    t = config.train
    loss_config = LossConfig(kl_clamp=t.kl_clamp, clip_ratio=t.clip_ratio, dual_clip=t.dual_clip)
    prompts, responses = columns["prompt_ids"], columns["response_ids"]
    teacher = [torch.tensor(v, dtype=torch.float32) for v in columns["teacher_logprobs"]]
    rows = list(range(len(prompts)))
    micro = t.micro_batch_size

    # lp_old: the trainer's own log-probs before any update; the PPO ratio is taken against these.
    with torch.no_grad():
        old = []
        for start in range(0, len(rows), micro):
            batch = rows[start : start + micro]
            old += sequence_logprobs(engine.module, [prompts[k] for k in batch], [responses[k] for k in batch],
                                     pad_id, t.logit_chunk_tokens)
    gaps = torch.cat([o - torch.tensor(r) for o, r in zip(old, columns["rollout_logprobs"])]).abs()

    stats = defaultdict(float)
    steps = minibatches(columns, t.mini_batch_prompts, seed)
    bar = Progress(len(rows), "train")
    for minibatch in steps:
        minibatch_tokens = sum(len(responses[k]) for k in minibatch)
        for start in range(0, len(minibatch), micro):
            batch = minibatch[start : start + micro]
            logprobs = sequence_logprobs(engine.module, [prompts[k] for k in batch], [responses[k] for k in batch],
                                         pad_id, t.logit_chunk_tokens)
            out = k1_policy_gradient_loss(torch.cat(logprobs), torch.cat([old[k] for k in batch]),
                                          torch.cat([teacher[k] for k in batch]), minibatch_tokens, loss_config)
            engine.backward(out.loss, scale_wrt_gas=False)
            stats["loss"] += out.loss.item()
            stats["clipped"] += out.clipped_tokens
            stats["reverse_kl"] += out.reverse_kl_sum
        # ZeRO stages 1-3 report the pre-clip norm after step(); stage 0 does not, so measure it here.
        stage0_norm = None if t.zero_stage else torch.nn.utils.get_total_norm(
            [p.grad for p in engine.module.parameters() if p.grad is not None])
        engine.step()
        stats["grad_norm"] += float(engine.get_global_grad_norm() if stage0_norm is None else stage0_norm)
        stats["tokens"] += minibatch_tokens
        bar.update(len(minibatch), minibatch_tokens)
    bar.close()
    return {
        "train/loss": stats["loss"] / len(steps),
        "train/grad_norm": stats["grad_norm"] / len(steps),
        "train/clip_fraction": stats["clipped"] / stats["tokens"],
        "train/reverse_kl": stats["reverse_kl"] / stats["tokens"],
        "train/logprob_gap_mean": gaps.mean().item(),
        "train/logprob_gap_max": gaps.max().item(),
        "train/optimizer_steps": len(steps),
        "train/lr": engine.get_lr()[0],
        "train/response_tokens": stats["tokens"],
    }


def save_checkpoint(engine, tokenizer, target: Path) -> None:
    """Write v_{i+1} beside its final name, mark it DONE, then rename: readers never see half of it."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    engine.module.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    engine.save_checkpoint(str(staging / OPTIMIZER_STATE), tag="state")
    (staging / shards.DONE).write_text(weights_sha256(staging) + "\n")
    os.replace(staging, target)


def prune_optimizer_states(run: Path, keep: tuple[Path, ...]) -> None:
    """Optimizer states are only needed to continue or redo training: keep the last two."""
    for state in Path(run, "checkpoints").glob(f"v*/{OPTIMIZER_STATE}"):
        if state.parent not in keep:
            shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    args = stage_arguments(__doc__).parse_args()
    quiet_libraries()
    run, iteration = args.run, args.iteration
    try:
        config = load_run_config(run)
        out_dir = shards.stage_dir(run, iteration, "train")
        if shards.read_manifest(out_dir) is not None:
            return
        source, target = shards.checkpoint_dir(run, iteration), shards.checkpoint_dir(run, iteration + 1)
        if not shards.checkpoint_ready(source):
            raise ConfigError(f"checkpoint {source} is not complete")
        scored = shards.read_stage(shards.stage_dir(run, iteration, "scored"), "scored")
        version = policy_version(source)
        check_on_policy(scored, version)
    except (ConfigError, shards.ContractError, StalePolicyError) as error:
        fail(str(error))
    set_threads(config)
    shards.reset_stage(out_dir)
    started = time.time()
    torch.manual_seed(config.seed * 100_003 + iteration)
    init_distributed()
    tokenizer, model = load_tokenizer(source), load_model(source)
    model.train()
    engine = deepspeed_engine(config, model)
    if (source / OPTIMIZER_STATE).exists():
        engine.load_checkpoint(str(source / OPTIMIZER_STATE), tag="state", load_optimizer_states=True,
                               load_lr_scheduler_states=True)
    setup_seconds = time.time() - started
    train_started = time.time()
    metrics = train_iteration(config, engine, scored.to_pydict(), tokenizer.pad_token_id, config.seed * 7 + iteration)
    metrics["train/tokens_per_s"] = metrics["train/response_tokens"] / max(time.time() - train_started, 1e-9)
    metrics["train/setup_seconds"] = setup_seconds
    save_checkpoint(engine, tokenizer, target)
    produced = policy_version(target)
    manifest = shards.write_manifest(out_dir, "train", iteration, config.hash(), started, metrics,
                                     {"policy_version": version, "produced_checkpoint": str(target),
                                      "produced_version": produced})
    prune_optimizer_states(run, keep=(source, target))
    stage_summary("train", iteration, scored.num_rows, int(metrics["train/response_tokens"]),
                  metrics["train/tokens_per_s"], manifest["seconds"],
                  f"{metrics['train/optimizer_steps']} steps, loss {metrics['train/loss']:.4f}, "
                  f"grad norm {metrics['train/grad_norm']:.3f} -> {produced}")


if __name__ == "__main__":
    main()
