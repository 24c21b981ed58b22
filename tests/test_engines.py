"""The HF sampling engine and the chunked log-prob gather agree with each other on the tiny student; the
teacher scorer refuses a teacher of another vocabulary."""
from pathlib import Path

import pytest
import torch
from pipeline_helpers import SHAPING_GENERATION_CONFIG, shaped_copy

from common.config import load_config
from common.data import load_prompts
from common.errors import ConfigError
from common.modeling import load_model, load_tokenizer, response_logprobs
from stages.generate.hf_engine import _generation_config, sample
from stages.generate.sampling import SamplingParams
from stages.score.teacher import open_scorer

STUDENT = "assets/tiny/student"
TEACHER = Path("assets/tiny/teacher")


def test_sampled_logprobs_match_a_recomputation():
    tokenizer, model = load_tokenizer(STUDENT), load_model(STUDENT)
    prompts = load_prompts("assets/tiny/data/eval.parquet", tokenizer, 1024, False).prompts[:12]
    params = SamplingParams(n=2, max_new_tokens=48, temperature=1.0, seed=3, batch_size=10)
    samples = sample(model, [p.prompt_ids for p in prompts], params, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert len(samples) == 24
    assert {(s.prompt_index, s.sample_idx) for s in samples} == {(p, k) for p in range(12) for k in range(2)}
    for s in samples:
        assert len(s.logprobs) == len(s.response_ids)
        assert (s.finish_reason == "stop") == (s.response_ids[-1] == tokenizer.eos_token_id)
    with torch.no_grad():
        # A small chunk forces several LM-head chunks through the gather.
        recomputed = response_logprobs(model, [prompts[s.prompt_index].prompt_ids for s in samples],
                                       [s.response_ids for s in samples], tokenizer.pad_token_id,
                                       chunk_tokens=37).sampled
    gap = max((torch.tensor(s.logprobs) - r).abs().max().item() for s, r in zip(samples, recomputed))
    assert gap < 1e-4


def test_same_seed_same_samples_and_another_seed_other_samples():
    tokenizer, model = load_tokenizer(STUDENT), load_model(STUDENT)
    prompts = [p.prompt_ids for p in load_prompts("assets/tiny/data/eval.parquet", tokenizer, 1024, False).prompts[:8]]
    params = SamplingParams(n=2, max_new_tokens=32, seed=11)
    first, second = (sample(model, prompts, params, [tokenizer.eos_token_id], tokenizer.pad_token_id) for _ in range(2))
    assert [s.response_ids for s in first] == [s.response_ids for s in second]
    other = sample(model, prompts, SamplingParams(n=2, max_new_tokens=32, seed=12), [tokenizer.eos_token_id],
                   tokenizer.pad_token_id)
    # The seed reaches the sampler: most of the 16 responses change with it (a fixed stream would change none).
    changed = sum(a.response_ids != b.response_ids for a, b in zip(first, other))
    assert changed >= 8, changed


def not_argmax_tokens(model, prompts: list[list[int]], samples) -> int:
    """Response tokens that are not the argmax of the model's next-token logits after their prefix (one
    full forward per response: no KV cache, no sampler code)."""
    misses = 0
    with torch.no_grad():
        for s in samples:
            prompt = prompts[s.prompt_index]
            logits = model(torch.tensor([prompt + s.response_ids])).logits[0]
            predicted = logits[len(prompt) - 1 : len(prompt) + len(s.response_ids) - 1].argmax(-1).tolist()
            misses += sum(p != t for p, t in zip(predicted, s.response_ids))
    return misses


def test_greedy_sampling_takes_the_argmax_token_at_every_step():
    """temperature 0 is greedy: every token is the argmax after its prefix; the control, sampling at
    temperature 1, takes other tokens (so the check can fail)."""
    tokenizer, model = load_tokenizer(STUDENT), load_model(STUDENT)
    prompts = [p.prompt_ids for p in load_prompts("assets/tiny/data/eval.parquet", tokenizer, 1024, False).prompts[:8]]
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    greedy = sample(model, prompts, SamplingParams(n=1, max_new_tokens=32, temperature=0.0), eos, pad)
    assert sum(map(len, (s.response_ids for s in greedy))) > 100 and not_argmax_tokens(model, prompts, greedy) == 0
    sampled = sample(model, prompts, SamplingParams(n=2, max_new_tokens=32, temperature=1.0, seed=5), eos, pad)
    assert not_argmax_tokens(model, prompts, sampled) > 0


def test_a_checkpoints_generation_config_does_not_shape_sampling(tmp_path):
    """A checkpoint whose generation_config.json sets a repetition penalty, top_k, top_p, min_p and a
    temperature samples exactly what the same weights without them sample."""
    shaped_dir = shaped_copy(STUDENT, tmp_path / "shaped")
    tokenizer = load_tokenizer(STUDENT)
    prompts = [p.prompt_ids for p in load_prompts("assets/tiny/data/eval.parquet", tokenizer, 1024, False).prompts[:8]]
    params = SamplingParams(n=2, max_new_tokens=32, seed=11)
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    shaped = load_model(shaped_dir)
    assert shaped.generation_config.repetition_penalty == SHAPING_GENERATION_CONFIG["repetition_penalty"]
    plain_samples, shaped_samples = sample(load_model(STUDENT), prompts, params, eos, pad), sample(shaped, prompts,
                                                                                                     params, eos, pad)
    assert [s.response_ids for s in shaped_samples] == [s.response_ids for s in plain_samples]
    assert [s.logprobs for s in shaped_samples] == [s.logprobs for s in plain_samples]
    # The control: transformers' own merge of that file into our options does change the samples.
    inherited = load_model(shaped_dir)
    width = max(map(len, prompts[:1]))
    torch.manual_seed(params.seed)
    out = inherited.generate(input_ids=torch.tensor([prompts[0]] * 2), attention_mask=torch.ones(2, width, dtype=torch.long),
                             generation_config=_generation_config(params, eos, pad))
    torch.manual_seed(params.seed)
    neutral = load_model(STUDENT).generate(input_ids=torch.tensor([prompts[0]] * 2),
                                           attention_mask=torch.ones(2, width, dtype=torch.long),
                                           generation_config=_generation_config(params, eos, pad))
    assert out.sequences.tolist() != neutral.sequences.tolist()


def test_a_teacher_with_another_vocabulary_is_refused_before_it_loads(tmp_path):
    """Distillation compares log-probs of the same ids: a teacher whose tokenizer has one token more is
    refused with the config key named; the tiny teacher (the same vocabulary) opens (negative control)."""
    config = load_config("configs/tiny.yaml")
    tokenizer = load_tokenizer(TEACHER)
    tokenizer.add_tokens(["<an-extra-token>"])
    tokenizer.save_pretrained(tmp_path)  # tokenizer files only: the check must come before any weights
    with pytest.raises(ConfigError, match="model.teacher: vocabulary size 333 != student's 332"):
        open_scorer(config, tmp_path)
    assert open_scorer(config, TEACHER).score  # the same vocabulary: opens
