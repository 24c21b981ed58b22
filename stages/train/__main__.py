"""Train stage: one iteration of on-policy distillation with DeepSpeed -> checkpoint v_{i+1}.

    python -m stages.train --run runs/tiny --iter 3
    deepspeed --num_gpus 2 --no_local_rank --module stages.train --run runs/tiny --iter 3   # data parallel

Starts from checkpoint v_i (and its optimizer state), refuses any scored row whose policy_version is
not v_i, recomputes lp_old without grad, then takes one optimizer step per mini-batch with the loss
of stages/train/loss.py, token-averaged over the whole mini-batch whatever the rank and micro-batch
split. A non-finite loss or gradient aborts the iteration before any checkpoint is written.
Writes v_{i+1} as HF safetensors + tokenizer + optimizer state (stages/train/stage.py).
"""
from __future__ import annotations

from common.errors import ConfigError, ContractError, NonFiniteError, StalePolicyError
from common.run import fail, load_run_config, quiet_libraries, set_threads, stage_arguments
from stages.train.stage import Trainer, train_stage


def main() -> None:
    args = stage_arguments(__doc__).parse_args()
    quiet_libraries()
    try:
        config = load_run_config(args.run)
        set_threads(config)
        train_stage(config, args.run, args.iteration, Trainer(config))
    except (ConfigError, ContractError, StalePolicyError) as error:
        fail(str(error))
    except NonFiniteError as error:
        fail(f"{error}; no checkpoint written (check the scored shard's teacher_logprobs and train.lr)")


if __name__ == "__main__":
    main()
