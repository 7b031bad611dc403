"""V: the convolutional variational autoencoder that compresses a frame into ``z``.

The architecture follows Ha & Schmidhuber (2018), appendix A.1: four stride-2
convolutions take a 64x64 RGB frame down to a 2x2x256 feature map, two linear heads
read the mean and log-variance of a diagonal Gaussian over ``z`` from it, and four
transposed convolutions map a sample of ``z`` back to a 64x64 image.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from worldmodels.config import Config


class MatmulConv2d(nn.Conv2d):
    """``nn.Conv2d`` (no padding, no dilation, one group) computed as one matrix product over
    its receptive fields: the same function, weights and state-dict keys.

    For a convolution with few output pixels, such as V's last one (2x2), this is about
    twice as fast on a CPU as the convolution kernels, which are made for large images.
    A channels-last input and weight (as rollouts use them) need no copy of the weight.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: Tensor) -> Tensor:
        (k, _), (s, _) = self.kernel_size, self.stride
        rows, cols = range(0, x.shape[-2] - k + 1, s), range(0, x.shape[-1] - k + 1, s)
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C): each receptive field reads k rows of k * C values
        fields = torch.stack([x[:, i : i + k, j : j + k] for i in rows for j in cols], dim=1)
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)  # the same (h, w, c) order
        out = torch.addmm(self.bias, fields.reshape(-1, weight.shape[1]), weight.T)
        return out.view(len(x), len(rows), len(cols), -1).permute(0, 3, 1, 2)


class VAE(nn.Module):
    """The paper's convolutional VAE ("V").

    Shapes, for a batch of ``N`` frames and ``z_size = 32``::

        x (N, 3, 64, 64) in [0, 1]
          conv 32 k4 s2 + ReLU  -> (N, 32, 31, 31)
          conv 64 k4 s2 + ReLU  -> (N, 64, 14, 14)
          conv 128 k4 s2 + ReLU -> (N, 128, 6, 6)
          conv 256 k4 s2 + ReLU -> (N, 256, 2, 2) -> flatten (N, 1024)
          linear -> mu (N, 32), linear -> logvar (N, 32)
        z (N, 32)
          linear -> (N, 1024) -> reshape (N, 1024, 1, 1)
          deconv 128 k5 s2 + ReLU -> (N, 128, 5, 5)
          deconv 64 k5 s2 + ReLU  -> (N, 64, 13, 13)
          deconv 32 k6 s2 + ReLU  -> (N, 32, 30, 30)
          deconv 3 k6 s2 + sigmoid -> x_hat (N, 3, 64, 64) in (0, 1)

    With ``z_size = 32`` the model has 4,348,547 parameters.
    """

    def __init__(self, z_size: int = 32):
        super().__init__()
        self.z_size = z_size
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 128, kernel_size=4, stride=2),
            nn.ReLU(),
            MatmulConv2d(128, 256, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.fc_mu = nn.Linear(1024, z_size)
        self.fc_logvar = nn.Linear(1024, z_size)
        self.fc_decode = nn.Linear(z_size, 1024)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(1024, 128, kernel_size=5, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, kernel_size=5, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, kernel_size=6, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 3, kernel_size=6, stride=2),
            nn.Sigmoid(),
        )

    @classmethod
    def from_config(cls, cfg: Config) -> VAE:
        """An untrained V of the shape ``cfg`` names."""
        return cls(cfg.vae.z_size)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the posterior parameters ``(mu, logvar)``, each (N, z_size), of frames ``x`` (N, 3, 64, 64).

        ``mu`` is the deterministic code to use when no sampling noise is wanted.
        """
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: Tensor) -> Tensor:
        """Map latent codes ``z`` (N, z_size) to frames (N, 3, 64, 64) with values in (0, 1)."""
        h = self.fc_decode(z).view(-1, 1024, 1, 1)
        return self.decoder(h)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample ``z = mu + sigma * eps`` with ``eps ~ N(0, I)``, differentiable in ``mu`` and ``logvar``.

        ``generator`` (on the same device as ``mu``) makes the noise reproducible.
        """
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, sample ``z`` with the reparameterisation trick, decode.

        Returns ``(x_hat, mu, logvar)``. It always samples, in training and in eval mode
        alike; for a noise-free reconstruction use ``vae.decode(vae.encode(x)[0])``.
        """
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator)
        return self.decode(z), mu, logvar

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Decode ``n`` draws of ``z ~ N(0, I)`` from the prior into frames (n, 3, 64, 64)."""
        weight = self.fc_decode.weight
        z = torch.randn((n, self.z_size), generator=generator, device=weight.device, dtype=weight.dtype)
        return self.decode(z)


def frames_to_tensor(frames: np.ndarray | Tensor) -> Tensor:
    """Convert uint8 frames (..., 64, 64, 3), channels last, to float (..., 3, 64, 64) in [0, 1].

    Works on a NumPy array or on a torch uint8 tensor (which stays on its device; no trip
    through NumPy). Any number of leading dimensions is kept, so a rollout of shape
    (T, 64, 64, 3) or a batch of rollouts (B, T, 64, 64, 3) both work.
    """
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        frames = frames.copy()  # torch warns about read-only arrays (e.g. some env observations)
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8 (values 0..255), got dtype {frames.dtype}")
    if frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (..., H, W, 3), got {tuple(frames.shape)}")
    return frames.movedim(-1, -3).contiguous().float() / 255.0


class VAELoss(NamedTuple):
    """The terms of :func:`vae_loss`, each a scalar tensor."""

    loss: Tensor
    """What is optimised: ``reconstruction`` + the KL term floored per sample (free bits)."""
    reconstruction: Tensor
    """Squared error summed over the pixels of each image, averaged over the batch."""
    kl: Tensor
    """KL(q(z|x) || N(0, I)) summed over z dimensions, averaged over the batch, *before* the floor (for logging)."""


def _kl_terms(mu: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise KL(N(mu, exp(logvar)) || N(0, 1)), same shape as ``mu``."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def vae_loss(x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, kl_tolerance: float = 0.5) -> VAELoss:
    """The VAE objective of the authors' code, with "free bits" on the KL term.

    For each image, the reconstruction term is the squared error summed over all
    3x64x64 values, and the KL term is ``KL(q(z|x) || N(0, I))`` summed over the ``z``
    dimensions. The per-image KL is then floored at ``kl_tolerance * z_size``
    (0.5 * 32 = 16 nats by default) before averaging over the batch, exactly as
    ``tf.maximum(kl_loss, kl_tolerance * z_size)`` in Ha's implementation.

    This floor is the *free bits* trick: while an image's KL is below the
    allowance, the KL term is a constant with zero gradient, so the encoder may spend
    up to ``kl_tolerance`` nats per dimension on information about the frame without
    being pulled back towards the prior. Only KL above the allowance is penalised.
    This keeps the encoder from collapsing ``q(z|x)`` onto the prior early in
    training, which would make ``z`` useless to M and C.

    Returns a :class:`VAELoss` whose ``loss`` is what to minimise and whose ``kl``
    field is the mean KL without the floor, the number worth logging.
    """
    reconstruction = (x_hat - x).pow(2).flatten(1).sum(dim=1).mean()
    kl_per_sample = _kl_terms(mu, logvar).sum(dim=-1)
    kl_floored = torch.clamp(kl_per_sample, min=kl_tolerance * mu.shape[-1])
    return VAELoss(
        loss=reconstruction + kl_floored.mean(),
        reconstruction=reconstruction,
        kl=kl_per_sample.mean(),
    )


def kl_per_dimension(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z_i|x) || N(0, 1)) for each latent dimension ``i``, averaged over the batch.

    ``mu`` and ``logvar`` are (..., z_size); the result is (z_size,). Dimensions with a
    KL near zero carry no information about the frame (they match the prior).
    """
    return _kl_terms(mu, logvar).reshape(-1, mu.shape[-1]).mean(dim=0)
