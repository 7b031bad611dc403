"""M: the mixture-density recurrent network that predicts the next latent ``z``.

An LSTM reads ``[z_t, a_t]`` and, from its hidden state ``h_t``, a linear layer gives a
Gaussian mixture for ``z_{t+1}``: following the authors' code each latent dimension has
its own mixture (its own weights, means and standard deviations), so for ``z_size=32``
and 5 components the output layer has 32 * 5 * 3 = 480 units.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodels.config import Config

LSTMState = tuple[Tensor, Tensor]
"""The recurrent state ``(h, c)``, each of shape (B, hidden_size)."""

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class MDNOutput(NamedTuple):
    """M's prediction for the next step.

    Shapes are (B, T, Z, K) from :meth:`MDRNN.forward` and (B, Z, K) from
    :meth:`MDRNN.step`, with Z the latent size and K the number of mixture components.
    """

    logpi: Tensor
    """Log mixture weights, log-softmaxed over the component axis K (the last one)."""
    mu: Tensor
    """Component means."""
    logsigma: Tensor
    """Log standard deviations of the components."""
    reward: Tensor | None
    """Predicted reward, (B, T) or (B,); ``None`` without a reward head."""
    done_logit: Tensor | None
    """Logit of the episode ending, (B, T) or (B,); ``None`` without a done head."""


class MDRNN(nn.Module):
    """The paper's MDN-RNN ("M"): an LSTM with a per-dimension Gaussian-mixture output.

    **Parameter count.** With the defaults (z 32, action 3, hidden 256, 5 components)
    the model has exactly the paper's 422,368 parameters: 299,008 in the LSTM
    (``4*256*(35+256)`` weights plus *one* bias vector of ``4*256``) and 123,360 in the
    output layer (``256*480 + 480``). PyTorch's ``nn.LSTM`` keeps two bias vectors
    (``b_ih`` and ``b_hh``, whose sum is all that matters), which would add a redundant
    1,024. So the LSTM here is built with ``bias=False`` and a constant 1 is appended to
    every input ``[z_t, a_t, 1]``: the last column of ``weight_ih`` is then the single
    bias vector, and sequences still go through the fused ``nn.LSTM`` kernel.
    The optional reward and done heads add 257 parameters each.

    **State convention.** :meth:`forward` and :meth:`step` both take and return the
    state as a tuple ``(h, c)`` of two tensors of shape (B, hidden_size) (no leading
    layer axis), so states from one can be fed to the other; ``state=None`` means zeros,
    as from :meth:`initial_state`.
    """

    def __init__(
        self,
        z_size: int = 32,
        action_size: int = 3,
        hidden_size: int = 256,
        n_gaussians: int = 5,
        reward_head: bool = False,
        done_head: bool = False,
    ):
        super().__init__()
        self.z_size = z_size
        self.action_size = action_size
        self.hidden_size = hidden_size
        self.n_gaussians = n_gaussians
        # +1 input for the constant feature that plays the role of the LSTM bias.
        self.lstm = nn.LSTM(z_size + action_size + 1, hidden_size, bias=False, batch_first=True)
        self.mdn = nn.Linear(hidden_size, z_size * n_gaussians * 3)
        self.reward_head = nn.Linear(hidden_size, 1) if reward_head else None
        self.done_head = nn.Linear(hidden_size, 1) if done_head else None

    @classmethod
    def from_config(cls, cfg: Config) -> MDRNN:
        """An untrained M of the shape ``cfg`` names (its heads included)."""
        m = cfg.mdrnn
        return cls(cfg.vae.z_size, 3, m.hidden_size, m.n_gaussians, reward_head=m.reward_head, done_head=m.done_head)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> LSTMState:
        """Zero state ``(h, c)``, each (batch_size, hidden_size), on ``device`` (default: the model's)."""
        weight = self.lstm.weight_hh_l0
        device = weight.device if device is None else device
        h = torch.zeros(batch_size, self.hidden_size, device=device, dtype=weight.dtype)
        return h, torch.zeros_like(h)

    def _inputs(self, z: Tensor, action: Tensor) -> Tensor:
        ones = torch.ones(*z.shape[:-1], 1, device=z.device, dtype=z.dtype)
        return torch.cat([z, action.to(z.dtype), ones], dim=-1)

    def _heads(self, h: Tensor) -> MDNOutput:
        """Read the mixture (and optional reward/done) from hidden states ``h`` (..., hidden)."""
        params = self.mdn(h).view(*h.shape[:-1], self.z_size, 3 * self.n_gaussians)
        # Per latent dimension the authors' layout is [K logits, K means, K log-sigmas].
        logits, mu, logsigma = params.split(self.n_gaussians, dim=-1)
        reward = self.reward_head(h).squeeze(-1) if self.reward_head is not None else None
        done_logit = self.done_head(h).squeeze(-1) if self.done_head is not None else None
        return MDNOutput(F.log_softmax(logits, dim=-1), mu, logsigma, reward, done_logit)

    def forward(self, z: Tensor, action: Tensor, state: LSTMState | None = None) -> tuple[MDNOutput, LSTMState]:
        """Run M over whole sequences (teacher forcing), batch first.

        ``z`` is (B, T, z_size), ``action`` is (B, T, action_size). The output at time t
        is the prediction of ``z_{t+1}`` from ``z_0..z_t`` and ``a_0..a_t``; its tensors
        are (B, T, Z, K) and (B, T) for the heads. Also returns the final state ``(h, c)``.
        """
        if state is None:
            state = self.initial_state(z.shape[0], z.device)
        h0, c0 = state
        hs, (h, c) = self.lstm(self._inputs(z, action), (h0.unsqueeze(0), c0.unsqueeze(0)))
        return self._heads(hs), (h.squeeze(0), c.squeeze(0))

    def step(self, z: Tensor, action: Tensor, state: LSTMState | None = None) -> tuple[MDNOutput, LSTMState]:
        """Advance M by one time step, for rollouts (e.g. when dreaming).

        ``z`` is (B, z_size), ``action`` is (B, action_size); outputs are (B, Z, K) and
        (B,) for the heads. This is the LSTM cell written out with the same weights as
        :meth:`forward` (gate order i, f, g, o as in ``nn.LSTM``), so stepping T times
        gives the same result as one call of :meth:`forward` on the sequence.
        """
        state = self.cell(z, action, state)
        return self._heads(state[0]), state

    def cell(self, z: Tensor, action: Tensor, state: LSTMState | None = None) -> LSTMState:
        """The LSTM cell of :meth:`step` without the heads: the next state ``(h, c)``, all a
        controller reads (rollouts in the real environment need nothing more)."""
        h, c = self.initial_state(z.shape[0], z.device) if state is None else state
        gates = self._inputs(z, action) @ self.lstm.weight_ih_l0.T + h @ self.lstm.weight_hh_l0.T
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def mdn_loss(out: MDNOutput, z_next: Tensor, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of ``z_next`` under M's per-dimension Gaussian mixtures.

    For every latent dimension, ``-log sum_k pi_k N(z; mu_k, sigma_k)``, computed in log
    space (``log N`` from ``logsigma``, then ``logsumexp`` over the components with
    ``logpi``) so that it stays finite for tiny sigmas or far-off targets.

    ``z_next`` has the shape of ``out.mu`` without the component axis: (B, T, Z) or (B, Z).
    ``reduction`` is ``"mean"`` (over batch, time and latent dimensions, as the
    authors did), ``"sum"``, or ``"none"`` (the per-dimension NLL, shape of ``z_next``).
    """
    z = z_next.unsqueeze(-1)
    log_normal = -0.5 * ((z - out.mu) * torch.exp(-out.logsigma)).pow(2) - out.logsigma - _LOG_SQRT_2PI
    nll = -torch.logsumexp(out.logpi + log_normal, dim=-1)
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    if reduction == "none":
        return nll
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class MDRNNLoss(NamedTuple):
    """The terms of :func:`mdrnn_loss`, each a scalar tensor."""

    loss: Tensor
    """What is optimised: ``gmm + reward_weight * reward + done_weight * done``."""
    gmm: Tensor
    """Mixture negative log-likelihood of the next latent, see :func:`mdn_loss`."""
    reward: Tensor
    """Mean squared error of the reward head, over-predictions weighted (0 without head or target)."""
    done: Tensor
    """Binary cross-entropy of the done head (0 without head or target)."""


def mdrnn_loss(
    out: MDNOutput,
    z_next: Tensor,
    reward: Tensor | None = None,
    done: Tensor | None = None,
    reward_weight: float = 1.0,
    done_weight: float = 1.0,
    mask: Tensor | None = None,
    overprediction: float = 1.0,
) -> MDRNNLoss:
    """M's training loss: mixture NLL of ``z_next`` plus the optional reward and done terms.

    The mixture NLL is averaged over the latent dimensions, then over the steps. The
    reward term (MSE) is used only when the model has a reward head *and* a ``reward``
    target is given; likewise the done term (binary cross-entropy on the logit, ``done``
    being 0/1 or bool). A missing term is reported as 0. Targets have the shape of
    ``out.reward`` / ``out.done_logit``: (B, T) or (B,).

    ``mask`` (that shape, bool) marks the steps that count: every term is averaged over
    those only, so the padding of short episodes changes nothing. ``None``: every step counts.

    ``overprediction`` weighs the squared error of the steps where the predicted reward
    exceeds the real one (1: plain MSE). Above 1, M learns to err low: a controller trained
    in the dream maximises M's rewards and finds where M invents them, so an invented
    reward costs more than a missed one.
    """
    gmm = _mean(mdn_loss(out, z_next, reduction="none").mean(-1), mask)
    zero = gmm.new_zeros(())
    reward_loss = zero
    if out.reward is not None and reward is not None:
        error = out.reward - reward.to(out.reward.dtype)
        weight = torch.where(error > 0, overprediction, 1.0) if overprediction != 1.0 else 1.0
        reward_loss = _mean(weight * error.pow(2), mask)
    done_loss = zero
    if out.done_logit is not None and done is not None:
        bce = F.binary_cross_entropy_with_logits(out.done_logit, done.to(out.done_logit.dtype), reduction="none")
        done_loss = _mean(bce, mask)
    loss = gmm + reward_weight * reward_loss + done_weight * done_loss
    return MDRNNLoss(loss=loss, gmm=gmm, reward=reward_loss, done=done_loss)


def _mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of `x` over every position, or over those where `mask` is True."""
    if mask is None:
        return x.mean()
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp_min(1)


def sample_next_z(out: MDNOutput, tau: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``z_{t+1}`` from M's mixtures at temperature ``tau``, independently per dimension.

    For each latent dimension a component is picked from ``Categorical(logits=logpi / tau)``
    and then ``z = mu + sigma * sqrt(tau) * eps`` with ``eps ~ N(0, 1)``, as in the
    authors' code. ``tau < 1`` makes the dream more predictable, ``tau > 1`` more
    chaotic (the paper trains C inside the dream at ``tau = 1.15``).

    Works on (B, Z, K) outputs from :meth:`MDRNN.step` and on (B, T, Z, K) outputs from
    :meth:`MDRNN.forward`; returns the shape without K. ``generator`` (on the outputs'
    device) makes the draw reproducible.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    k = out.logpi.shape[-1]
    probs = F.softmax(out.logpi / tau, dim=-1).reshape(-1, k)
    index = torch.multinomial(probs, 1, generator=generator).view(*out.logpi.shape[:-1], 1)
    mu = out.mu.gather(-1, index).squeeze(-1)
    sigma = out.logsigma.gather(-1, index).squeeze(-1).exp()
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + sigma * math.sqrt(tau) * eps
