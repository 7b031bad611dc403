import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, MixtureSameFamily, Normal

from worldmodels.mdrnn import MDNOutput, MDRNN, mdn_loss, mdrnn_loss, sample_next_z


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_output(shape: tuple[int, ...], k: int = 5, seed: int = 0) -> MDNOutput:
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(*shape, k, generator=g)
    mu = torch.randn(*shape, k, generator=g)
    logsigma = 0.5 * torch.randn(*shape, k, generator=g)
    return MDNOutput(F.log_softmax(logits, dim=-1), mu, logsigma, None, None)


def test_parameter_count_matches_paper():
    model = MDRNN()
    assert n_params(model.lstm) == 4 * 256 * (35 + 256) + 4 * 256 == 299_008
    assert n_params(model.mdn) == 256 * 480 + 480 == 123_360
    assert n_params(model) == 422_368


def test_parameter_count_with_heads():
    assert n_params(MDRNN(reward_head=True)) == 422_368 + 257
    assert n_params(MDRNN(done_head=True)) == 422_368 + 257
    assert n_params(MDRNN(reward_head=True, done_head=True)) == 422_368 + 2 * 257


def test_forward_shapes_and_softmax_axis():
    torch.manual_seed(0)
    model = MDRNN(reward_head=True, done_head=True)
    out, (h, c) = model(torch.randn(2, 7, 32), torch.randn(2, 7, 3))
    assert out.logpi.shape == out.mu.shape == out.logsigma.shape == (2, 7, 32, 5)
    assert out.reward.shape == out.done_logit.shape == (2, 7)
    assert h.shape == c.shape == (2, 256)
    torch.testing.assert_close(out.logpi.exp().sum(-1), torch.ones(2, 7, 32))
    # Each latent dimension has its own mixture weights.
    assert not torch.allclose(out.logpi[..., 0, :], out.logpi[..., 1, :])

    no_heads, _ = MDRNN()(torch.randn(2, 7, 32), torch.randn(2, 7, 3))
    assert no_heads.reward is None and no_heads.done_logit is None


def test_output_layout_follows_authors():
    # Per latent dimension the linear output is [K logits, K means, K log-sigmas].
    model = MDRNN(z_size=2, action_size=1, hidden_size=4, n_gaussians=3)
    with torch.no_grad():
        model.mdn.weight.zero_()
        model.mdn.bias.copy_(torch.arange(18.0))
    out, _ = model(torch.zeros(1, 1, 2), torch.zeros(1, 1, 1))
    torch.testing.assert_close(out.logpi[0, 0], F.log_softmax(torch.tensor([[0.0, 1, 2], [9, 10, 11]]), dim=-1))
    torch.testing.assert_close(out.mu[0, 0], torch.tensor([[3.0, 4, 5], [12, 13, 14]]))
    torch.testing.assert_close(out.logsigma[0, 0], torch.tensor([[6.0, 7, 8], [15, 16, 17]]))


def test_step_matches_sequence_forward():
    torch.manual_seed(0)
    model = MDRNN(reward_head=True, done_head=True)
    z, a = torch.randn(3, 6, 32), torch.randn(3, 6, 3)
    state = (0.5 * torch.randn(3, 256), 0.5 * torch.randn(3, 256))
    seq_out, seq_state = model(z, a, state)
    for t in range(6):
        out, state = model.step(z[:, t], a[:, t], state)
        for name in MDNOutput._fields:
            torch.testing.assert_close(getattr(out, name), getattr(seq_out, name)[:, t], atol=1e-5, rtol=0)
    torch.testing.assert_close(state[0], seq_state[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(state[1], seq_state[1], atol=1e-5, rtol=0)


def test_step_default_state_is_initial_state():
    torch.manual_seed(0)
    model = MDRNN()
    z, a = torch.randn(2, 32), torch.randn(2, 3)
    h, c = model.initial_state(2)
    assert h.shape == c.shape == (2, 256) and not h.any() and not c.any()
    out_none, state_none = model.step(z, a)
    out_zero, state_zero = model.step(z, a, (h, c))
    torch.testing.assert_close(out_none.mu, out_zero.mu)
    torch.testing.assert_close(state_none[0], state_zero[0])
    seq_out, _ = model(z.unsqueeze(1), a.unsqueeze(1))
    torch.testing.assert_close(seq_out.mu[:, 0], out_none.mu, atol=1e-5, rtol=0)


def test_constant_input_is_the_single_bias():
    # With zero z, action and state, the gates are exactly the last column of weight_ih.
    model = MDRNN()
    _, (h, c) = model.step(torch.zeros(1, 32), torch.zeros(1, 3))
    i, f, g, o = model.lstm.weight_ih_l0[:, -1].chunk(4)
    expected_c = torch.sigmoid(i) * torch.tanh(g)
    torch.testing.assert_close(c[0], expected_c)
    torch.testing.assert_close(h[0], torch.sigmoid(o) * torch.tanh(expected_c))


def reference_nll(out: MDNOutput, z_next: torch.Tensor) -> torch.Tensor:
    mixture = MixtureSameFamily(Categorical(logits=out.logpi), Normal(out.mu, out.logsigma.exp()))
    return -mixture.log_prob(z_next)


def test_mdn_loss_matches_torch_distributions():
    out = random_output((4, 6, 32))
    z_next = 1.5 * torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(1))
    ref = reference_nll(out, z_next)
    torch.testing.assert_close(mdn_loss(out, z_next, reduction="none"), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mdn_loss(out, z_next), ref.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mdn_loss(out, z_next, reduction="sum"), ref.sum(), atol=1e-3, rtol=1e-5)
    # Step-shaped outputs (B, Z, K) work too.
    step_out = random_output((4, 32))
    torch.testing.assert_close(mdn_loss(step_out, z_next[:, 0]), reference_nll(step_out, z_next[:, 0]).mean())
    with pytest.raises(ValueError, match="reduction"):
        mdn_loss(out, z_next, reduction="max")


def test_mdn_loss_single_gaussian_hand_value():
    # One component, N(0, 1), at z = 1: NLL = 0.5 * log(2 pi) + 0.5.
    out = MDNOutput(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), None, None)
    assert mdn_loss(out, torch.ones(1, 1, 1)).item() == pytest.approx(0.5 * math.log(2 * math.pi) + 0.5)


def test_mdn_loss_is_stable_for_far_targets_and_tiny_sigmas():
    out = random_output((2, 3, 32))
    out = out._replace(logsigma=torch.full_like(out.logsigma, -8.0))
    loss = mdn_loss(out, torch.full((2, 3, 32), 50.0))
    assert torch.isfinite(loss) and loss.item() > 1e6


def test_mdrnn_loss_terms():
    out = random_output((2, 4, 32))
    z_next = torch.randn(2, 4, 32)
    plain = mdrnn_loss(out, z_next, reward=torch.ones(2, 4), done=torch.ones(2, 4))
    assert plain.reward.item() == 0.0 and plain.done.item() == 0.0  # no heads
    torch.testing.assert_close(plain.loss, mdn_loss(out, z_next))

    out = out._replace(reward=torch.full((2, 4), 0.5), done_logit=torch.zeros(2, 4))
    reward = torch.tensor([[0.5, 0.5, 2.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
    done = torch.zeros(2, 4, dtype=torch.bool)
    terms = mdrnn_loss(out, z_next, reward=reward, done=done, reward_weight=2.0, done_weight=3.0)
    assert terms.reward.item() == pytest.approx(4.0 / 8)  # one error of 2
    assert terms.done.item() == pytest.approx(math.log(2.0))  # logit 0 -> p = 0.5
    assert terms.loss.item() == pytest.approx(terms.gmm.item() + 2.0 * 0.5 + 3.0 * math.log(2.0), rel=1e-6)
    assert mdrnn_loss(out, z_next).loss.item() == pytest.approx(terms.gmm.item())  # heads but no targets


def test_overpredicted_rewards_weigh_more():
    out = random_output((1, 4, 32))._replace(reward=torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    z_next = torch.randn(1, 4, 32)
    reward = torch.tensor([[0.0, 3.0, 1.0, 0.5]])  # errors +1, -2, 0, +0.5: two over-predictions
    mask = torch.tensor([[True, True, True, False]])  # the last step is padding
    assert mdrnn_loss(out, z_next, reward=reward, overprediction=1.0).reward.item() == pytest.approx((1 + 4 + 0 + 0.25) / 4)
    weighted = mdrnn_loss(out, z_next, reward=reward, overprediction=5.0)
    assert weighted.reward.item() == pytest.approx((5 * 1 + 4 + 0 + 5 * 0.25) / 4)
    assert mdrnn_loss(out, z_next, reward=reward, mask=mask, overprediction=5.0).reward.item() == pytest.approx((5 + 4) / 3)


def masked_reference(out, z_next, reward, done, mask):
    """M's masked loss terms written out step by step in float64: the mean over the valid steps."""
    steps = [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    gmm = reward_loss = done_loss = 0.0
    for b, t in steps:
        for d in range(z_next.shape[-1]):
            mixture = MixtureSameFamily(
                Categorical(logits=out.logpi[b, t, d].double()),
                Normal(out.mu[b, t, d].double(), out.logsigma[b, t, d].double().exp()),
            )
            gmm -= mixture.log_prob(z_next[b, t, d].double()).item() / z_next.shape[-1]
        reward_loss += (out.reward[b, t].item() - reward[b, t].item()) ** 2
        p = 1 / (1 + math.exp(-out.done_logit[b, t].item()))
        done_loss -= math.log(p) if done[b, t] else math.log(1 - p)
    n = len(steps)
    return gmm / n, reward_loss / n, done_loss / n


def masked_example():
    """An output of M with heads on a batch of 2 x 5 steps whose second sequence is padded after 2 steps."""
    out = random_output((2, 5, 3), k=4, seed=1)
    g = torch.Generator().manual_seed(2)
    out = out._replace(reward=torch.randn(2, 5, generator=g), done_logit=torch.randn(2, 5, generator=g))
    z_next, reward = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, generator=g)
    done = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    return out, z_next, reward, done, mask


def test_masked_mdrnn_loss_is_the_mean_over_valid_steps():
    out, z_next, reward, done, mask = masked_example()
    terms = mdrnn_loss(out, z_next, reward, done, reward_weight=2.0, done_weight=3.0, mask=mask)
    gmm, reward_loss, done_loss = masked_reference(out, z_next, reward, done, mask)
    assert terms.gmm.item() == pytest.approx(gmm, rel=1e-5)
    assert terms.reward.item() == pytest.approx(reward_loss, rel=1e-5)
    assert terms.done.item() == pytest.approx(done_loss, rel=1e-5)
    assert terms.loss.item() == pytest.approx(gmm + 2.0 * reward_loss + 3.0 * done_loss, rel=1e-5)
    # every step counting: the same as an all-True mask, and as the reference over all steps
    every = mdrnn_loss(out, z_next, reward, done)
    all_true = mdrnn_loss(out, z_next, reward, done, mask=torch.ones(2, 5, dtype=torch.bool))
    assert torch.stack(every).tolist() == pytest.approx(torch.stack(all_true).tolist(), rel=1e-6)
    full = masked_reference(out, z_next, reward, done, torch.ones(2, 5, dtype=torch.bool))
    assert [every.gmm.item(), every.reward.item(), every.done.item()] == pytest.approx(full, rel=1e-5)
    assert every.gmm.item() != pytest.approx(gmm, rel=1e-3)  # the padding would have counted


def test_masked_mdrnn_loss_ignores_padded_steps():
    out, z_next, reward, done, mask = masked_example()
    base = mdrnn_loss(out, z_next, reward, done, mask=mask)
    padded_z, padded_reward, padded_done = z_next.clone(), reward.clone(), done.clone()
    padded_z[1, 2:], padded_reward[1, 2:], padded_done[1, 2:] = float("nan"), 1e6, 1.0
    padded = mdrnn_loss(out, padded_z, padded_reward, padded_done, mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(base, padded))
    assert base.loss.shape == ()


def test_heads_train_end_to_end():
    torch.manual_seed(0)
    model = MDRNN(reward_head=True, done_head=True)
    z, a = torch.randn(2, 5, 32), torch.randn(2, 5, 3)
    out, _ = model(z[:, :-1], a[:, :-1])
    terms = mdrnn_loss(out, z[:, 1:], reward=torch.ones(2, 4), done=torch.zeros(2, 4))
    terms.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.reward_head.weight.grad.abs().sum() > 0 and model.done_head.weight.grad.abs().sum() > 0


def test_sample_next_z_is_deterministic_with_generator():
    out = random_output((3, 32))
    a = sample_next_z(out, 1.15, torch.Generator().manual_seed(7))
    b = sample_next_z(out, 1.15, torch.Generator().manual_seed(7))
    c = sample_next_z(out, 1.15, torch.Generator().manual_seed(8))
    assert a.shape == (3, 32)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert sample_next_z(random_output((2, 5, 32)), generator=torch.Generator().manual_seed(0)).shape == (2, 5, 32)


def test_sample_next_z_degenerate_mixture_returns_that_mean():
    out = random_output((4, 3, 32))
    winner = torch.randint(0, 5, (4, 3, 32, 1), generator=torch.Generator().manual_seed(2))
    logits = torch.zeros(4, 3, 32, 5).scatter(-1, winner, 1e4)
    out = out._replace(logpi=F.log_softmax(logits, dim=-1), logsigma=torch.full_like(out.mu, -20.0))
    z = sample_next_z(out, tau=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, out.mu.gather(-1, winner).squeeze(-1), atol=1e-6, rtol=0)


def test_sample_next_z_empirical_moments():
    # One mixture per dimension, replicated over a large batch.
    single = random_output((1, 4), seed=3)
    n = 20_000
    out = MDNOutput(*(t.expand(n, 4, 5) for t in single[:3]), None, None)
    z = sample_next_z(out, generator=torch.Generator().manual_seed(0))
    pi, mu, sigma = single.logpi.exp()[0], single.mu[0], single.logsigma.exp()[0]
    mean = (pi * mu).sum(-1)
    var = (pi * (sigma**2 + mu**2)).sum(-1) - mean**2
    torch.testing.assert_close(z.mean(0), mean, atol=4 * (var / n).sqrt().max().item(), rtol=0)
    torch.testing.assert_close(z.var(0), var, atol=0, rtol=0.1)


def test_sample_next_z_temperature():
    # tau scales the component variance by tau and sharpens/flattens the weights.
    out = MDNOutput(torch.zeros(50_000, 1, 1), torch.zeros(50_000, 1, 1), torch.zeros(50_000, 1, 1), None, None)
    z = sample_next_z(out, tau=4.0, generator=torch.Generator().manual_seed(0))
    assert z.std().item() == pytest.approx(2.0, rel=0.03)
    logpi = F.log_softmax(torch.tensor([0.0, math.log(3.0)]), dim=-1).expand(50_000, 1, 2)
    mu = torch.tensor([0.0, 1.0]).expand(50_000, 1, 2)
    two = MDNOutput(logpi, mu, torch.full((50_000, 1, 2), -20.0), None, None)
    # Weights 1:3 at tau = 1 and 1:9 at tau = 0.5 (probabilities raised to 1 / tau).
    assert sample_next_z(two, 1.0, torch.Generator().manual_seed(0)).mean().item() == pytest.approx(0.75, abs=0.01)
    assert sample_next_z(two, 0.5, torch.Generator().manual_seed(0)).mean().item() == pytest.approx(0.9, abs=0.01)
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError, match="tau"):
            sample_next_z(two, tau)
