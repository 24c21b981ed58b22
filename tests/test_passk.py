"""pass@k: the unbiased estimator against a brute force over every k-subset of the samples."""
import itertools
from math import comb

import pytest

from common.passk import ks_up_to, pass_at_k, pass_at_ks


def brute_force(outcomes: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_chance_that_k_of_the_n_samples_hold_a_correct_one(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(outcomes, k), abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_1_is_the_mean_accuracy_and_large_n_stays_finite():
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)
    assert 0 < pass_at_k(4096, 3, 1024) < 1  # C(4096, 1024) would overflow a float


def test_pass_at_ks_averages_over_prompts_at_powers_of_two():
    prompts = ["a"] * 4 + ["b"] * 4
    correct = [True, False, False, False] + [False] * 4
    assert ks_up_to(4) == [1, 2, 4] and ks_up_to(6) == [1, 2, 4, 6]
    assert pass_at_ks(prompts, correct) == pytest.approx({1: 0.125, 2: 0.25, 4: 0.5})
    with pytest.raises(ValueError, match="same number of samples"):
        pass_at_ks(["a", "a", "b"], [True, False, True])
