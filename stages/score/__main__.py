"""Score stage: teacher log-prob of every sampled token, plus the rule reward -> scored shards.

    python -m stages.score --run runs/tiny --iter 3

Reads iter=i/rollouts/ and scores its shards in order, each row by the teacher of its data_source
(score.teachers; one teacher for all by default; stages/score/teacher.py), the verifier grading each
shard while the teachers run; scored shard k is rollout shard k plus the
teacher columns and rewards (stages/score/scoring.py). Then it seals iter=i/scored/.
"""
from __future__ import annotations

import time

from common import shards
from common.errors import ConfigError, ContractError
from common.run import fail, load_run_config, quiet_libraries, set_threads, stage_arguments
from stages.score.scoring import score_shard, seal_scored, sealed_rollouts, start_scoring, teacher_versions
from stages.score.teacher import Teachers


def main() -> None:
    args = stage_arguments(__doc__).parse_args()
    quiet_libraries()
    try:
        config = load_run_config(args.run)
        set_threads(config)
        if not start_scoring(config, args.run, args.iteration):
            return
        rollouts_dir = shards.stage_dir(args.run, args.iteration, "rollouts")
        files = [rollouts_dir / shard.file for shard in sealed_rollouts(args.run, args.iteration)]
        started, versions = time.time(), teacher_versions(config)
        teachers = Teachers(config)  # a teacher opens when its first row comes
        try:
            done = [score_shard(config, args.run, args.iteration, path, teachers, versions) for path in files]
        finally:
            teachers.close()
        seal_scored(config, args.run, args.iteration, done, started, versions)
    except (ConfigError, ContractError, ImportError) as error:
        fail(str(error))


if __name__ == "__main__":
    main()
