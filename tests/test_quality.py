"""M's quality measures on constructed data with known answers."""

import math

import numpy as np
import pytest
import torch

from worldmodels.mdrnn import MDRNN
from worldmodels.quality import LatentEpisode, explained_variance, gaussian_nll, m_quality, persistence_variance, sample_codes
from worldmodels.vae import VAE


def episode(mu: np.ndarray, reward: np.ndarray | None = None, done: np.ndarray | None = None) -> LatentEpisode:
    t = len(mu) - 1
    return LatentEpisode(
        mu.astype(np.float32), np.zeros_like(mu, np.float32), np.zeros((t, 3), np.float32),
        np.zeros(t, np.float32) if reward is None else reward.astype(np.float32),
        np.zeros(t, bool) if done is None else done,
    )


def test_persistence_variance_of_a_steady_drift_is_the_step_squared():
    mu = np.outer(np.arange(11), [0.5, -2.0])
    np.testing.assert_allclose(persistence_variance([episode(mu)]), [0.25, 4.0])


def test_persistence_variance_of_a_constant_sequence_is_the_floor():
    np.testing.assert_allclose(persistence_variance([episode(np.ones((5, 3)))], floor=1e-4), [1e-4] * 3)


def test_prior_and_persistence_nll_match_the_closed_forms():
    torch.manual_seed(0)
    mu = np.outer(np.arange(21), [0.5, -2.0]) / 10
    q = m_quality(VAE(2), MDRNN(2, 3, 8, 2, reward_head=True, done_head=True), [episode(mu)])
    targets = mu[1:]
    np.testing.assert_allclose(q.nll_prior, (0.5 * math.log(2 * math.pi) + 0.5 * targets**2).mean(0), rtol=1e-6)
    np.testing.assert_allclose(q.nll_persistence, 0.5 * np.log(2 * math.pi * math.e * np.array([0.0025, 0.04])), rtol=1e-6)


def test_gaussian_nll_of_the_standard_normal_at_zero():
    assert gaussian_nll(np.zeros(1), 0.0, 1.0)[0] == pytest.approx(0.5 * math.log(2 * math.pi))


def test_explained_variance_is_one_for_a_perfect_head_and_zero_for_the_mean():
    actual = np.array([1.0, -2.0, 3.0, 0.5])
    assert explained_variance(actual, actual) == 1.0
    assert explained_variance(np.full(4, actual.mean()), actual) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="constant"):
        explained_variance(actual, np.ones(4))


def test_reward_and_done_counts_follow_the_heads():
    torch.manual_seed(0)
    m = MDRNN(2, 3, 8, 2, reward_head=True, done_head=True)
    with torch.no_grad():
        m.reward_head.weight.zero_(), m.reward_head.bias.fill_(1.0)
        m.done_head.weight.zero_(), m.done_head.bias.fill_(5.0)  # always "ends"
    done = np.zeros(4, bool)
    done[-1] = True
    q = m_quality(VAE(2), m, [episode(np.zeros((5, 2)), np.array([0.0, 2.0, 0.0, 2.0]), done)])
    assert q.reward_mse == pytest.approx(1.0) and q.reward_mse_constant == pytest.approx(1.0)
    assert q.reward_explained_variance == pytest.approx(0.0)
    assert (q.ends_seen, q.ends_predicted, q.ends_hit) == (1, 4, 1)


def test_m_quality_without_heads_reports_none():
    q = m_quality(VAE(2), MDRNN(2, 3, 8, 2), [episode(np.zeros((4, 2)))])
    assert q.reward_predicted is None and q.reward_explained_variance is None and q.ends_predicted is None


def test_latent_episode_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="reward"):
        LatentEpisode(np.zeros((4, 2)), np.zeros((4, 2)), np.zeros((3, 3)), np.zeros(2), np.zeros(3, bool))
    with pytest.raises(ValueError, match="mu"):
        LatentEpisode(np.zeros((6, 2)), np.zeros((6, 2)), np.zeros((3, 3)), np.zeros(3), np.zeros(3, bool))


def test_sample_codes_draws_around_the_means_with_the_posterior_spread():
    mu = np.zeros((20001, 2), np.float32)
    ep = LatentEpisode(mu, np.log(np.full_like(mu, 0.25)), np.zeros((20000, 3), np.float32), np.zeros(20000), np.zeros(20000, bool))
    z = sample_codes(ep, np.random.default_rng(0)).mu
    np.testing.assert_allclose(z.std(0), [0.5, 0.5], rtol=0.02)
    np.testing.assert_allclose(z.mean(0), [0.0, 0.0], atol=0.01)
