import numpy as np
import pytest
import torch

from clrface.metrics.verification import best_threshold, rank_k_accuracy, verification_accuracy


def test_best_threshold_hand_example():
    # Sorted: 0.1(d) 0.2(d) 0.3(s) 0.4(d) 0.5(s) 0.6(s): best split between 0.2 and 0.3 -> 5/6 correct.
    s = np.array([0.3, 0.1, 0.6, 0.4, 0.2, 0.5])
    y = np.array([1, 0, 1, 0, 0, 1], bool)
    t, acc = best_threshold(s, y)
    assert acc == pytest.approx(5 / 6)
    assert 0.2 < t <= 0.3 or 0.4 < t <= 0.5  # both splits give 5/6
    assert ((s >= t) == y).mean() == pytest.approx(5 / 6)


def test_verification_separable_and_distance_mode():
    rng = np.random.default_rng(0)
    same = np.tile([True] * 30 + [False] * 30, 10)
    sim = np.where(same, rng.uniform(0.6, 1.0, same.size), rng.uniform(0.0, 0.5, same.size))
    acc, sd = verification_accuracy(sim, same, 10)
    assert acc == 1.0 and sd == 0.0
    acc_d, _ = verification_accuracy(torch.from_numpy(1 - sim), torch.from_numpy(same), 10, higher_is_same=False)
    assert acc_d == 1.0


def test_verification_noise_and_known_overlap():
    rng = np.random.default_rng(1)
    same = rng.random(6000) < 0.5
    acc, _ = verification_accuracy(rng.random(6000), same, 10)
    assert abs(acc - 0.5) < 0.04  # no information -> chance
    # Gaussian classes N(+1,1) vs N(-1,1): Bayes accuracy Phi(1) = 0.8413.
    sim = np.where(same, 1.0, -1.0) + rng.standard_normal(6000)
    acc, _ = verification_accuracy(sim, same, 10)
    assert acc == pytest.approx(0.8413, abs=0.015)


def test_rank_k_accuracy_hand_example():
    gallery = torch.eye(3)  # ids a, b, c
    ids = ["a", "b", "c"]
    probes = torch.tensor([
        [0.9, 0.1, 0.0],  # a: rank 1
        [0.6, 0.5, 0.0],  # b: second -> rank 2
        [0.5, 0.4, 0.3],  # c: third -> rank 3
        [0.0, 0.0, 1.0],  # d: not in gallery -> skipped
    ])
    r = rank_k_accuracy(gallery, ids, probes, ["a", "b", "c", "d"], ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    with pytest.raises(ValueError):
        rank_k_accuracy(gallery, ids, probes[:1], ["z"], ks=(1,))
