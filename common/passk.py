"""pass@k, the unbiased estimator of Chen et al. 2021 (Evaluating Large Language Models Trained on
Code, section 2.1): from n >= k samples of a prompt of which c are correct,

    pass@k = 1 - C(n - c, k) / C(n, k)

the probability that at least one of k samples drawn without replacement from those n is correct,
averaged over prompts. avg@k (the mean accuracy of the samples) is pass@1. Computed as a product,
not with factorials, so n in the thousands stays exact in floating point.
"""
from __future__ import annotations

from collections import defaultdict


def pass_at_k(n: int, c: int, k: int) -> float:
    """One prompt's unbiased pass@k from n samples, c of them correct (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself when it is not a power of two)."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == n else ks + [n]


def pass_at_ks(prompt_ids: list[str], correct: list[bool]) -> dict[int, float]:
    """{k: pass@k averaged over prompts} for k = 1, 2, 4, ..., n, from one row per sample. Every
    prompt must have the same number of samples n."""
    samples: dict[str, list[bool]] = defaultdict(list)
    for prompt, ok in zip(prompt_ids, correct):
        samples[prompt].append(bool(ok))
    counts = {len(values) for values in samples.values()}
    if len(counts) != 1:
        raise ValueError(f"pass@k needs the same number of samples per prompt, got {sorted(counts)}")
    n = counts.pop()
    return {k: sum(pass_at_k(n, sum(values), k) for values in samples.values()) / len(samples) for k in ks_up_to(n)}
