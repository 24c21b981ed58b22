"""The HF sampling engine and the chunked log-prob gather agree with each other on the tiny student."""
import torch

from common.data import load_prompts
from common.modeling import load_model, load_tokenizer, response_logprobs
from stages.generate.hf_engine import sample
from stages.generate.sampling import SamplingParams

STUDENT = "assets/tiny/student"


def test_sampled_logprobs_match_a_recomputation():
    tokenizer, model = load_tokenizer(STUDENT), load_model(STUDENT)
    prompts = load_prompts("assets/tiny/data/eval.parquet", tokenizer, 1024, False).prompts[:12]
    params = SamplingParams(n=2, max_new_tokens=48, temperature=1.0, seed=3, batch_size=10)
    samples = sample(model, [p.prompt_ids for p in prompts], params, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert len(samples) == 24 and {(s.prompt_index, s.sample_idx) for s in samples} == {(p, k) for p in range(12) for k in range(2)}
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


def test_same_seed_same_samples():
    tokenizer, model = load_tokenizer(STUDENT), load_model(STUDENT)
    prompts = [p.prompt_ids for p in load_prompts("assets/tiny/data/eval.parquet", tokenizer, 1024, False).prompts[:8]]
    params = SamplingParams(n=2, max_new_tokens=32, seed=11)
    first, second = (sample(model, prompts, params, [tokenizer.eos_token_id], tokenizer.pad_token_id) for _ in range(2))
    assert [s.response_ids for s in first] == [s.response_ids for s in second]
    greedy = SamplingParams(n=1, max_new_tokens=32, temperature=0.0)
    assert all(lp <= 0 for s in sample(model, prompts, greedy, [tokenizer.eos_token_id], tokenizer.pad_token_id)
               for lp in s.logprobs)
