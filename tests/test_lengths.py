"""The card's lengths on this CPU: generation within a KV budget, varlen attention for packed rows
(no dense mask), teacher batches by tokens, the sampling distribution's entropy, and the guard on
truncated responses."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from common import shards
from common.attention import attention_implementation
from common.batching import micro_batches
from common.config import load_config
from common.data import load_prompts
from common.errors import ConfigError, StageFailed
from common.memory import peak_rss_gib, reset_peaks, rss_gib
from common.modeling import load_model, load_tokenizer, response_logprobs
from orchestrator.loop import check_length_health
from stages.generate.hf_engine import kv_batches, kv_bytes_per_token, sample
from stages.generate.sampling import SamplingParams
from stages.score.teacher import HfScorer

STUDENT = "assets/tiny/student"


# ---- the KV budget --------------------------------------------------------------------------------

def test_batches_fill_the_kv_budget_and_never_pass_it():
    per_token, max_new = 1000, 90
    lengths = sorted([10] * 5 + [30] * 5)
    budget = 500_000  # 5 rows of the shortest prompt (100 tokens each), 4 of the longest (120 each)
    sizes = kv_batches(lengths, max_new, per_token, budget, batch_size=256)
    assert sizes == [5, 4, 1]
    start = 0
    for size in sizes:
        batch = lengths[start : start + size]
        assert size * (max(batch) + max_new) * per_token <= budget
        start += size
    assert kv_batches(lengths, max_new, per_token, budget=10**12, batch_size=3) == [3, 3, 3, 1]  # the row cap binds
    assert kv_batches([100], 28, 1, budget=10**9, batch_size=8, width_multiple=64) == [1]  # widths round up


def test_qwen3_1_7b_in_bf16_needs_112_kib_of_kv_per_token():
    config = Qwen3Config(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=128)
    assert kv_bytes_per_token(config, itemsize=2) == 112 * 1024


def test_a_budget_that_cannot_hold_one_sequence_is_refused_at_load():
    with pytest.raises(ConfigError, match="generate.kv_cache_gib") as refused:
        load_config("configs/tiny.yaml", ["generate.kv_cache_gib=0.0001"])  # 2 KiB a token x 193 tokens > 107 KiB
    assert "\n" not in str(refused.value)
    load_config("configs/tiny.yaml", ["generate.kv_cache_gib=0.01"])  # the negative control: 10 MiB holds it


def test_long_responses_are_sampled_in_batches_within_the_budget():
    """512 new tokens for 32 sequences under a budget of 4 of them: the engine samples 8 batches and
    every response keeps log-probs that match a recomputation (the batching changes nothing else)."""
    tokenizer, model = load_tokenizer(STUDENT), load_model(STUDENT)
    prompts = [p.prompt_ids for p in load_prompts("assets/tiny/data/eval.parquet", tokenizer, 1024, False).prompts[:16]]
    per_token = kv_bytes_per_token(model.config, 4)
    budget = 4 * (max(map(len, prompts)) + 512) * per_token
    params = SamplingParams(n=2, max_new_tokens=512, seed=5, batch_size=256)
    sizes = kv_batches(sorted(len(p) for p in prompts for _ in range(2)), 512, per_token, budget, 256)
    assert len(sizes) >= 8 and max(sizes) <= 4
    samples = sample(model, prompts, params, [tokenizer.eos_token_id], tokenizer.pad_token_id, kv_budget=budget)
    assert len(samples) == 32
    with torch.no_grad():
        again = response_logprobs(model, [prompts[s.prompt_index] for s in samples], [s.response_ids for s in samples],
                                  tokenizer.pad_token_id).sampled
    assert max((torch.tensor(s.logprobs) - r).abs().max().item() for s, r in zip(samples, again)) < 1e-4


# ---- varlen attention for packed rows ----------------------------------------------------------

def random_qwen3(attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
                         tie_word_embeddings=True, attn_implementation=attn)
    return Qwen3ForCausalLM(config).eval()


def rows(count: int, response: int) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(1)
    return ([torch.randint(1, 512, (96,), generator=g).tolist() for _ in range(count)],
            [torch.randint(1, 512, (response,), generator=g).tolist() for _ in range(count)])


def peak_above_baseline(fn):
    reset_peaks()
    base = rss_gib()
    out = fn()
    return out, peak_rss_gib() - base


def test_a_packed_forward_of_8_rows_of_4k_tokens_matches_per_row_without_a_dense_mask():
    """The attention the pipeline chooses takes the rows' boundaries: the same log-probs as a padded
    batch (within 1e-4; fp32 sums in another order) at no more than 2x its peak memory + 0.2 GiB. The
    negative control, the packed row as transformers' sdpa gets it without boundaries (position ids
    restarting: it builds a dense block mask), breaks the same bound at half the tokens."""
    model = random_qwen3(attention_implementation())
    prompts, responses = rows(8, 4000)
    with torch.no_grad():
        padded, padded_peak = peak_above_baseline(lambda: response_logprobs(model, prompts, responses, 0, packed=False))
        packed, packed_peak = peak_above_baseline(lambda: response_logprobs(model, prompts, responses, 0, packed=True))
    assert max((a - b).abs().max().item() for a, b in zip(packed.sampled, padded.sampled)) < 1e-4
    assert packed_peak <= 2 * padded_peak + 0.2, (packed_peak, padded_peak)

    dense = random_qwen3("sdpa")
    half_prompts, half_responses = rows(8, 2000)
    ids = [token for p, r in zip(half_prompts, half_responses) for token in p + r]
    positions = [k for p, r in zip(half_prompts, half_responses) for k in range(len(p) + len(r))]
    with torch.no_grad():
        _, dense_peak = peak_above_baseline(lambda: dense.model(input_ids=torch.tensor([ids]),
                                                                position_ids=torch.tensor([positions]), use_cache=False))
    assert dense_peak > 2 * padded_peak + 0.2, (dense_peak, padded_peak)


def test_a_packed_forward_refuses_a_model_whose_attention_ignores_the_boundaries():
    prompts, responses = rows(2, 10)
    with pytest.raises(ValueError, match="sequence boundaries"):
        response_logprobs(random_qwen3("sdpa"), prompts, responses, 0, packed=True)


def test_a_packed_backward_of_8_rows_of_4k_tokens_gives_the_per_row_gradient_within_the_memory_bound():
    model = random_qwen3(attention_implementation())
    prompts, responses = rows(8, 4000)

    def gradient(packed: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        out = response_logprobs(model, prompts, responses, 0, packed=packed)
        torch.cat(out.sampled).sum().backward()
        return model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    padded, padded_peak = peak_above_baseline(lambda: gradient(False))
    packed, packed_peak = peak_above_baseline(lambda: gradient(True))
    assert ((packed - padded).norm() / padded.norm()).item() < 1e-4
    assert packed_peak <= 2 * padded_peak + 0.2, (packed_peak, padded_peak)


# ---- the teacher's batches by tokens ------------------------------------------------------------

def test_teacher_batches_are_planned_by_tokens_and_score_the_same():
    config = load_config("configs/tiny.yaml", ["score.batch_size=64"])
    tokenizer = load_tokenizer(STUDENT)
    prompts = [p.prompt_ids for p in load_prompts("assets/tiny/data/eval.parquet", tokenizer, 1024, False).prompts[:24]]
    columns = {"prompt_ids": prompts, "response_ids": [list(range(5, 5 + 3 * (k % 7 + 1))) for k in range(24)]}
    tokens = [len(p) + len(r) for p, r in zip(columns["prompt_ids"], columns["response_ids"])]
    assert len(micro_batches(list(range(24)), tokens, 200, 64)) > 1  # this budget splits them
    by_rows = HfScorer("assets/tiny/teacher", config).score(columns)
    config.score.max_tokens_per_batch = 200
    by_tokens = HfScorer("assets/tiny/teacher", config).score(columns)
    for a, b in zip(by_rows["teacher_logprobs"], by_tokens["teacher_logprobs"]):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


# ---- length health ------------------------------------------------------------------------------

def test_the_recorded_entropy_is_that_of_the_distributions_the_tokens_were_sampled_from():
    tokenizer, model = load_tokenizer(STUDENT), load_model(STUDENT)
    prompts = [p.prompt_ids for p in load_prompts("assets/tiny/data/eval.parquet", tokenizer, 1024, False).prompts[:6]]
    samples = sample(model, prompts, SamplingParams(n=2, max_new_tokens=40, seed=2), [tokenizer.eos_token_id],
                     tokenizer.pad_token_id)
    for s in samples:  # recomputed: the full distribution at each response position, teacher-forced
        ids = torch.tensor([prompts[s.prompt_index] + s.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompts[s.prompt_index]) - 1 : -1].double()
        log_p = torch.log_softmax(logits, -1)
        assert abs(-(log_p.exp() * log_p).sum().item() - s.entropy_sum) < 1e-3 * len(s.response_ids)


def truncated_run(tmp_path, fraction: float):
    run = tmp_path / "run"
    shards.write_manifest(shards.stage_dir(run, 3, "rollouts"), "rollouts", 3, 0.0,
                          {"generate/truncated_fraction": fraction})
    return run


def test_too_many_truncated_responses_warn_or_stop_by_choice(tmp_path, capsys):
    run = truncated_run(tmp_path, 0.4)
    check_length_health(load_config("configs/tiny.yaml"), run, 3)  # default: warn at 25%
    assert "40% of the rollouts were cut" in capsys.readouterr().err
    with pytest.raises(StageFailed, match="stopped before training") as stopped:
        check_length_health(load_config("configs/tiny.yaml", ["health.on_truncation=stop"]), run, 3)
    assert "\n" not in str(stopped.value)
    check_length_health(load_config("configs/tiny.yaml", ["health.on_truncation=stop",
                                                          "health.max_truncated_fraction=0.5"]), run, 3)
    assert capsys.readouterr().err == ""
