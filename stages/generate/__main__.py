"""Generate stage: sample the current policy on this iteration's prompts -> rollout shards.

    python -m stages.generate --run runs/tiny --iter 3 [--eval-only [--eval-k K]]

Loads checkpoint v_i, checks it against the trainer's weight-sync probe, samples n responses per
prompt at temperature 1 and writes iter=i/rollouts/. When the iteration is due for evaluation
(eval.every) it also samples the eval sets with the eval settings (avg@k), grades them and writes
iter=i/eval/. Finished outputs are skipped (stages/generate/plan.py). The sampling runs in a process
of its own (common/executors.py: LocalExecutor), as in `orchestrator.mode: subprocess`.
"""
from __future__ import annotations

from common import shards
from common.errors import ConfigError, ContractError, StageFailed
from common.executors import LocalExecutor
from common.run import fail, load_run_config, quiet_environment, stage_arguments
from stages.generate.plan import collect_generation, render_prompts, submit_generation


def main() -> None:
    parser = stage_arguments(__doc__)
    parser.add_argument("--eval-only", action="store_true", help="only evaluate checkpoint v_i")
    parser.add_argument("--eval-k", type=int, default=None, help="samples per eval prompt (default: eval.k)")
    args = parser.parse_args()
    quiet_environment()
    try:
        config = load_run_config(args.run)
        shards.verify_policy(shards.checkpoint_dir(args.run, args.iteration), trusted=True)  # sizes: the plan hashes
        with LocalExecutor() as executor:
            render_prompts(executor, args.run, args.iteration)
            sampling = submit_generation(executor, config, args.run, args.iteration, args.eval_only, args.eval_k)
            collect_generation(executor, config, args.run, args.iteration, sampling)
    except ContractError as error:
        fail(f"{error}: train iteration {args.iteration - 1} (again) first")
    except (ConfigError, StageFailed) as error:
        fail(str(error))


if __name__ == "__main__":
    main()
