"""Generate stage: sample the current policy on this iteration's prompts -> rollout shards.

    python -m stages.generate --run runs/tiny --iter 3 [--eval-only [--eval-k K]]

Loads checkpoint v_i, checks it against the trainer's weight-sync probe, samples n responses per
prompt at temperature 1 and writes iter=i/rollouts/. When the iteration is due for evaluation
(eval.every) it also samples the eval sets with the eval settings (avg@k), grades them and writes
iter=i/eval/. Finished outputs are skipped (stages/generate/stage.py).
"""
from __future__ import annotations

from common.errors import ConfigError, ContractError, WeightSyncError
from common.run import fail, load_run_config, quiet_libraries, set_threads, stage_arguments
from stages.generate.engines import open_engine
from stages.generate.stage import generate_stage


def main() -> None:
    parser = stage_arguments(__doc__)
    parser.add_argument("--eval-only", action="store_true", help="only evaluate checkpoint v_i")
    parser.add_argument("--eval-k", type=int, default=None, help="samples per eval prompt (default: eval.k)")
    args = parser.parse_args()
    quiet_libraries()
    try:
        config = load_run_config(args.run)
        set_threads(config)
        engine = generate_stage(config, args.run, args.iteration, lambda checkpoint: open_engine(config, checkpoint),
                                args.eval_only, args.eval_k)
    except ContractError as error:
        fail(f"{error}: train iteration {args.iteration - 1} (again) first")
    except (ConfigError, ImportError, WeightSyncError) as error:
        fail(str(error))
    if engine is not None:
        engine.close()


if __name__ == "__main__":
    main()
