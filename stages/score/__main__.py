"""Score stage: teacher log-prob of every sampled token, plus the rule reward -> scored shards.

    python -m stages.score --run runs/tiny --iter 3

Reads iter=i/rollouts/ and scores its shards in order with one teacher (stages/score/teacher.py),
the verifier grading each shard while the teacher runs; scored shard k is rollout shard k plus the
teacher columns and rewards (stages/score/scoring.py). Then it seals iter=i/scored/.
"""
from __future__ import annotations

import time

from common import shards
from common.config import ConfigError
from common.hub import local_model_dir
from common.run import fail, load_run_config, quiet_libraries, set_threads, stage_arguments
from stages.score.scoring import score_shard, seal_scored, sealed_rollouts, start_scoring, teacher_version
from stages.score.teacher import open_scorer


def main() -> None:
    args = stage_arguments(__doc__).parse_args()
    quiet_libraries()
    try:
        config = load_run_config(args.run)
        set_threads(config)
        if not start_scoring(config, args.run, args.iteration):
            return
        rollouts_dir = shards.stage_dir(args.run, args.iteration, "rollouts")
        files = [rollouts_dir / shard["file"] for shard in sealed_rollouts(args.run, args.iteration)]
        started, version = time.time(), teacher_version(config)
        scorer = open_scorer(config, local_model_dir(config.model.teacher))
        try:
            done = [score_shard(config, args.run, args.iteration, path, scorer, version) for path in files]
        finally:
            scorer.close()
        seal_scored(config, args.run, args.iteration, done, started, version)
    except (ConfigError, shards.ContractError, ImportError) as error:
        fail(str(error))


if __name__ == "__main__":
    main()
