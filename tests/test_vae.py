import math
import warnings

import numpy as np
import pytest
import torch

from worldmodels.vae import VAE, frames_to_tensor, kl_per_dimension, vae_loss


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def vae() -> VAE:
    torch.manual_seed(0)
    return VAE()


def test_parameter_count_matches_paper(vae):
    assert n_params(vae) == 4_348_547


def test_parameter_count_scales_with_z_size():
    # Only the two encoder heads and the decoder's input layer depend on z_size.
    assert n_params(VAE(z_size=64)) - n_params(VAE(z_size=32)) == 3 * 32 * 1024 + 2 * 32


def test_shapes_and_decoder_range(vae):
    x = torch.rand(2, 3, 64, 64)
    x_hat, mu, logvar = vae(x)
    assert x_hat.shape == (2, 3, 64, 64)
    assert mu.shape == logvar.shape == (2, 32)
    assert vae.encoder(x).shape == (2, 1024)
    # Far-out latents saturate the sigmoid but must stay inside [0, 1].
    extreme = vae.decode(50 * torch.randn(4, 32))
    assert extreme.min() >= 0 and extreme.max() <= 1
    samples = vae.sample(3)
    assert samples.shape == (3, 3, 64, 64)
    assert samples.min() >= 0 and samples.max() <= 1


def test_forward_uses_the_reparameterised_sample(vae):
    x = torch.rand(2, 3, 64, 64)
    x_hat, mu, logvar = vae(x, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x_hat, vae.decode(mu + torch.exp(0.5 * logvar) * eps))


def test_reparameterize():
    mu = torch.tensor([[1.0, -2.0]])
    logvar = torch.log(torch.tensor([[4.0, 0.25]]))
    eps = torch.randn((1, 2), generator=torch.Generator().manual_seed(3))
    z = VAE.reparameterize(mu, logvar, torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, mu + torch.tensor([[2.0, 0.5]]) * eps)
    # Zero variance leaves only the mean; gradients reach mu and logvar.
    mu = torch.zeros(1000, 2, requires_grad=True)
    logvar = torch.zeros(1000, 2, requires_grad=True)
    z = VAE.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    assert abs(z.std().item() - 1.0) < 0.05
    z.sum().backward()
    assert mu.grad is not None and logvar.grad is not None


def test_sample_is_reproducible_with_generator(vae):
    a = vae.sample(2, generator=torch.Generator().manual_seed(5))
    b = vae.sample(2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_frames_to_tensor_layout_numpy_and_torch():
    frames = np.zeros((2, 5, 64, 64, 3), dtype=np.uint8)
    frames[1, 4, 10, 20, 0] = 255  # red at row 10, column 20
    frames[0, 0, 3, 7, 2] = 51  # a bit of blue
    x = frames_to_tensor(frames)
    assert x.shape == (2, 5, 3, 64, 64) and x.dtype == torch.float32
    assert x[1, 4, 0, 10, 20] == 1.0
    assert x[0, 0, 2, 3, 7] == pytest.approx(0.2)
    assert x.sum().item() == pytest.approx(1.2)
    assert x.is_contiguous()

    y = frames_to_tensor(torch.from_numpy(frames))
    torch.testing.assert_close(x, y)
    single = frames_to_tensor(frames[0, 0])
    assert single.shape == (3, 64, 64)
    with pytest.raises(TypeError, match="uint8"):
        frames_to_tensor(frames.astype(np.float32))

    frames.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(frames_to_tensor(frames), x)


def test_vae_loss_free_bits_floor():
    x = torch.zeros(4, 3, 64, 64)
    mu = torch.zeros(4, 32)
    logvar = torch.zeros(4, 32)
    terms = vae_loss(x, x, mu, logvar)
    assert terms.reconstruction.item() == 0.0
    assert terms.kl.item() == 0.0  # posterior equals the prior
    assert terms.loss.item() == pytest.approx(0.5 * 32)  # floored to kl_tolerance * z_size
    # No gradient flows through the KL term while it is under the allowance.
    mu.requires_grad_(True)
    vae_loss(x, x, mu, logvar).loss.backward()
    assert torch.count_nonzero(mu.grad) == 0


def test_vae_loss_kl_hand_values():
    x = torch.zeros(2, 3, 64, 64)
    # mu = 1, var = 1: KL = 0.5 * mu^2 = 0.5 per dim -> 16 summed, exactly at the floor.
    terms = vae_loss(x, x, torch.ones(2, 32), torch.zeros(2, 32))
    assert terms.kl.item() == pytest.approx(16.0)
    assert terms.loss.item() == pytest.approx(16.0)
    # mu = 2, var = 1: 2 per dim -> 64, above the floor, counted in full.
    terms = vae_loss(x, x, torch.full((2, 32), 2.0), torch.zeros(2, 32))
    assert terms.kl.item() == pytest.approx(64.0)
    assert terms.loss.item() == pytest.approx(64.0)
    # mu = 0, var = 2: 0.5 * (2 - 1 - ln 2) per dim.
    terms = vae_loss(x, x, torch.zeros(2, 32), torch.full((2, 32), math.log(2.0)), kl_tolerance=0.0)
    assert terms.kl.item() == pytest.approx(32 * 0.5 * (1 - math.log(2.0)), rel=1e-5)
    assert terms.loss.item() == pytest.approx(terms.kl.item())


def test_vae_loss_floor_is_per_sample_then_mean():
    x = torch.zeros(2, 3, 64, 64)
    # Sample 0 has KL 0 (floored to 16), sample 1 has KL 64.
    mu = torch.stack([torch.zeros(32), torch.full((32,), 2.0)])
    terms = vae_loss(x, x, mu, torch.zeros(2, 32))
    assert terms.kl.item() == pytest.approx((0 + 64) / 2)
    assert terms.loss.item() == pytest.approx((16 + 64) / 2)  # not max(32, 16)


def test_vae_loss_reconstruction_sums_pixels_and_averages_batch():
    x = torch.zeros(2, 3, 64, 64)
    x_hat = torch.zeros(2, 3, 64, 64)
    x_hat[0] = 0.5  # 12288 values * 0.25
    x_hat[1, 1, 0, 0] = 1.0  # a single value * 1
    terms = vae_loss(x_hat, x, torch.full((2, 32), 2.0), torch.zeros(2, 32))
    expected = (3 * 64 * 64 * 0.25 + 1.0) / 2
    assert terms.reconstruction.item() == pytest.approx(expected)
    assert terms.loss.item() == pytest.approx(expected + 64.0)


def test_kl_per_dimension():
    mu = torch.zeros(3, 4)
    mu[:, 1] = torch.tensor([1.0, 2.0, 3.0])  # KL 0.5 * mu^2 -> mean (0.5 + 2 + 4.5) / 3
    logvar = torch.zeros(3, 4)
    logvar[:, 2] = math.log(2.0)
    kl = kl_per_dimension(mu, logvar)
    expected = torch.tensor([0.0, 7.0 / 3.0, 0.5 * (1 - math.log(2.0)), 0.0])
    torch.testing.assert_close(kl, expected)
    # Summing the per-dimension values gives the unfloored KL of vae_loss.
    x = torch.zeros(3, 3, 64, 64)
    assert kl.sum().item() == pytest.approx(vae_loss(x, x, mu, logvar).kl.item())
