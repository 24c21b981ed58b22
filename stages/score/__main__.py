"""Score stage: teacher log-prob of every sampled token, plus the rule reward -> scored shards.

    python -m stages.score --run runs/tiny --iter 3

Reads iter=i/rollouts/ and scores its shards in order, each row by the teacher of its data_source
(score.teachers; one teacher for all by default; stages/score/teacher.py), the verifier grading each
shard while the teachers run; scored shard k is rollout shard k plus the teacher columns and rewards
(stages/score/scoring.py). Then it seals iter=i/scored/. The teachers run in a process of their own
(common/executors.py: LocalExecutor), as in `orchestrator.mode: subprocess`.
"""
from __future__ import annotations

from common.errors import ConfigError, ContractError, StageFailed
from common.executors import LocalExecutor
from common.run import fail, load_run_config, quiet_environment, stage_arguments
from stages.score.plan import collect_scoring, submit_scoring


def main() -> None:
    args = stage_arguments(__doc__).parse_args()
    quiet_environment()
    try:
        config = load_run_config(args.run)
        with LocalExecutor() as executor:
            scoring = submit_scoring(executor, config, args.run, args.iteration)
            collect_scoring(executor, config, args.run, args.iteration, scoring)
    except (ConfigError, ContractError, StageFailed) as error:
        fail(str(error))


if __name__ == "__main__":
    main()
