"""DeepSpeed for the train stage: the process group, the engine over the policy, collectives, export.

Training forwards go through the engine (`engine(prompts, responses, ...)`), never around it. Under
ZeRO-3 the engine's forward is what advances the optimizer's micro-step counter; a forward through
`engine.module` left it at 0, so every backward overwrote the gradient partitions instead of adding
to them and an optimizer step kept only the last micro-batch's gradient (docs/training.md). Forwards
without gradients (lp_old) may go through `engine.module`: they add nothing to accumulate.
"""
from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common.config import Config, TrainConfig
from common.devices import check_torch_sees_the_gpus
from common.errors import ConfigError
from common.modeling import load_model, response_logprobs
from common.run import free_port
from common.seeds import lr_factor
from stages.train.records import OPTIMIZER_STATE


class PolicyLogprobs(torch.nn.Module):
    """The policy as the DeepSpeed engine runs it: log-probs of response tokens, LM head in chunks.

    `forward` returns the log-probs of every response token of the rows, flat in row order, and
    at `at_ids` ([rows][tokens][k]) when given. The HF model is `self.policy` (what is exported).
    """

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, prompts: list[list[int]], responses: list[list[int]], pad_id: int, chunk_tokens: int,
                packed: bool, at_ids: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = response_logprobs(self.policy, prompts, responses, pad_id, chunk_tokens, packed=packed, at_ids=at_ids)
        return torch.cat(out.sampled), None if out.at_ids is None else torch.cat(out.at_ids)


# ---- ranks and collectives ----------------------------------------------------------------

def init_distributed(rank: int | None = None, world: int | None = None, address: str | None = None) -> tuple[int, int]:
    """Join (once per process) the trainer's process group: NCCL on GPUs, gloo on CPUs.

    The DeepSpeed launcher sets RANK/WORLD_SIZE/MASTER_ADDR itself; a lone process is rank 0 of 1;
    a resident trainer passes its rank, the world size and the rendezvous `host:port`.
    """
    import deepspeed

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    check_torch_sees_the_gpus()
    if rank is not None:
        host, port = (address or f"127.0.0.1:{free_port()}").rsplit(":", 1)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank % max(torch.cuda.device_count(), 1)),
                          WORLD_SIZE=str(world), MASTER_ADDR=host, MASTER_PORT=port)
    elif "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # On CPUs DeepSpeed builds its shared-memory comm op here and print()s "... built successfully"
    # each time: a banner in every iteration's output, not news. Errors still raise.
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL takes only CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    """The sum (or max, ...) over ranks of per-rank numbers; the values themselves on one rank."""
    if rank_and_world()[1] == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


# ---- the engine -----------------------------------------------------------------------------

def deepspeed_config(t: TrainConfig, bf16: bool) -> dict:
    """DeepSpeed's config for `t`; `bf16` trains in bf16 with fp32 gradient accumulation (and fp32
    master weights in the optimizer), as verl does."""
    if bf16 and t.zero_stage == 0:  # DeepSpeed accumulates bf16 gradients in fp32 only from stage 1
        raise ConfigError("config key 'train.zero_stage': stage 0 would accumulate bf16 gradients in bf16; "
                          "use train.zero_stage >= 1 (or train.bf16=false)")
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # We own accumulation: micro-batches vary in number, and step() is the mini-batch boundary.
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def open_engine(config: Config, checkpoint: Path, bf16: bool | None = None):
    """A DeepSpeed engine over PolicyLogprobs(policy at `checkpoint`), with its optimizer state
    (Adam moments, step count, lr schedule) restored from the checkpoint when it has one."""
    import deepspeed

    t = config.train
    bf16 = t.bf16 and torch.cuda.is_available() if bf16 is None else bf16
    model = load_model(checkpoint)
    model.train()
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = PolicyLogprobs(model)
    if t.offload_optimizer:  # the optimizer step then runs on the CPU: use DeepSpeed's vectorised Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        optimizer = DeepSpeedCPUAdam(policy.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                     adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(policy.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, t.warmup_steps, t.decay_steps, t.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(t, bf16))
    state = Path(checkpoint) / OPTIMIZER_STATE
    if state.exists():  # a pickle: the caller verified its sha256 against the checkpoint's DONE first
        engine.load_checkpoint(str(state), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True)
    return engine


def export_policy(engine, tokenizer, staging: Path) -> None:
    """Write the policy as HF safetensors + tokenizer into `staging` (collective).

    Under ZeRO-3 each rank holds a shard of every tensor: GatheredParameters assembles whole ones
    for the duration of the export (a no-op for the other stages).
    """
    import deepspeed

    rank = rank_and_world()[0]
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if rank == 0:
            engine.module.policy.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)


def save_optimizer_state(engine, checkpoint: Path) -> tuple[dict[str, dict], dict[str, float]]:
    """Write the optimizer state (Adam moments, master weights, step count, lr schedule) into
    `checkpoint`/optimizer_state (collective: every rank writes its part), then hash it, the ranks
    sharing the files out so each is read once. Returns ({name: {sha256, bytes}}, timings) on every rank."""
    from common.shards import hash_files

    started = time.time()
    engine.save_checkpoint(str(Path(checkpoint) / OPTIMIZER_STATE), tag="state")
    dist.barrier()
    written = time.time()
    rank, world = rank_and_world()
    names = sorted(str(f.relative_to(checkpoint)) for f in (Path(checkpoint) / OPTIMIZER_STATE).rglob("*")
                   if f.is_file())
    files = hash_files(Path(checkpoint), names[rank::world])
    if world > 1:
        gathered: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, files)
        files = {name: entry for part in gathered for name, entry in part.items()}
    return files, {"train/state_write_seconds": written - started, "train/state_hash_seconds": time.time() - written}
