"""Train stage: one iteration of on-policy distillation with DeepSpeed -> checkpoint v_{i+1}.

    python -m stages.train --run runs/tiny --iter 3

Starts from checkpoint v_i (and its optimizer state), refuses any scored row whose policy_version is
not v_i, recomputes lp_old without grad, then takes one optimizer step per mini-batch with the loss
of stages/train/loss.py, token-averaged over the whole mini-batch whatever the rank and micro-batch
split. A non-finite loss or gradient aborts the iteration before any checkpoint is written.
Writes v_{i+1} as HF safetensors + tokenizer + optimizer state (stages/train/stage.py). Each of the
train.processes ranks runs in a process of its own (common/executors.py: LocalExecutor; data
parallel when there are several), as in `orchestrator.mode: subprocess`.
"""
from __future__ import annotations

from common.errors import ConfigError, ContractError, StageFailed
from common.executors import LocalExecutor
from common.run import fail, load_run_config, quiet_environment, stage_arguments
from stages.train.records import collect_training, seal_training, submit_training


def main() -> None:
    args = stage_arguments(__doc__).parse_args()
    quiet_environment()
    try:
        config = load_run_config(args.run)
        with LocalExecutor() as executor:
            saving = collect_training(executor, config, args.run, args.iteration,
                                      submit_training(executor, config, args.run, args.iteration))
            if saving is not None:
                seal_training(executor, config, args.run, saving)
    except (ConfigError, ContractError, StageFailed) as error:
        fail(str(error))


if __name__ == "__main__":
    main()
