"""This pipeline against TRL's on-policy distillation trainer on the same tiny task (`make bench-peers`).

    python -m bench.peers [--iterations 20] [--seeds 1] [--eval-prompts 500] [--time-cap-s 900]
                          [--variant NAME=KEY=VALUE,...] [--trl-vllm]
    python -m bench.peers report [--eval-missing]   # the report again (grading the checkpoints skipped first)

Method. Every system trains the tiny student (assets/tiny/student) from the tiny teacher on the same
prompts, on the same 2 cores, one run at a time.

- The pipeline, once per variant: `python -m orchestrator iterate` on configs/tiny.yaml with the
  variant's overrides (the default variant is the config as it is; `k1` is the card's loss),
  eval.every=0 (every system is evaluated afterwards, by one evaluator), and sampling and the teacher
  forward in batches of one optimizer step's 64 sequences, as TRL runs them (pipeline.py:
  step_batch_overrides; with the tiny config's 256 and 128, sampling was 12-15% and the teacher 4-9%
  slower on 2 cores, A/B of 12-iteration runs on 2026-12-07).
- TRL: `trl.DistillationTrainer` (beta=1: reverse KL over the full vocabulary, completions always
  sampled from the current student, i.e. GKD with lmbda=1), in one process. It samples one completion
  per prompt and generates once per optimizer step, so its dataset lists every prompt of the
  pipeline's schedule n times, in the pipeline's mini-batch order: the same prompts, samples and
  optimizer steps per iteration. Same seed, sampling (temperature 1, top_p 1, top_k 0), fp32, and the
  pipeline's optimizer and schedule passed in as objects (common/seeds.py: lr_factor).

Seeds. `--seeds N` runs every system N times, with the config's `seed` 0..N-1 (which prompts, their
order, the sampling; the student and teacher stay the same), seed by seed. Every figure is a mean
over the seeds: the accuracy at each checkpoint (with its standard deviation over seeds: the
spread), the clock there, the phases.

Evaluation. Every run's checkpoints, the starting student and the teacher are graded afterwards by
the loop's own evaluator (tiny_world.evaluate.accuracy = stages/generate/jobs.py: evaluate_engine):
one sample per prompt at temperature 1, 64 new tokens, seed 0, on the 500 prompts of the tiny eval
split, or with `--eval-prompts P` on P prompts: that split and then the next pairs its generator
draws, disjoint from training (bench/peers/evaluation.py: eval_set). 500 prompts leave a standard
error of up to 0.022 on one accuracy, 2,500 of up to 0.010. The teacher's accuracy is the 100%
reference; the target is 80% of it.

Speed-up. "The same accuracy" is the best accuracy the slower of the two mean curves reached; each
system's time is the mean clock at the first checkpoint where its mean curve gets there. As a second
figure that reads the whole curve rather than one crossing, the area under accuracy against samples
divided by the samples spent (the mean accuracy over the budget), and its ratio to the peer's; and
the number of checkpoints where two mean curves differ by more than the sum of their spreads.

Clock. A run's clock starts just before its process is launched (Python start-up, imports and model
loading included). Time to a checkpoint: the pipeline's train manifest `finished_at` of that
iteration; TRL's time when its step ends, minus the time spent writing earlier checkpoints.

Phases. The pipeline's come from its stage manifests (bench/peers/pipeline.py): sampling, the
teacher forward, the optimizer steps (lp_old included), and each stage's wall time; TRL's from clocks
around its methods (bench/peers/trl.py). The report (bench/peers/report.py) writes bench/results.md and
bench/results/peers.json.
"""
