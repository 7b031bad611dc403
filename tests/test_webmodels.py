"""The ONNX models the book's pages run (worldmodels.webmodels) against PyTorch, in onnxruntime."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import worldmodels as wm
from worldmodels.controller import Controller
from worldmodels.mdrnn import MDRNN
from worldmodels.webmodels import DECODER_FILE, META_FILE, export_web_models, sample_from_noise, used_dimensions


@pytest.fixture(scope="module")
def book():
    return wm.pretrained.load("book", controller="first")  # the models the book's pages run


@pytest.fixture(scope="module")
def starts(book):
    d = np.load(book.path / "controller" / "dream_starts.npz")
    return d["mu"].astype(np.float32), d["logvar"].astype(np.float32)


@pytest.fixture(scope="module")
def controller(book):
    return Controller("zh", 32, book.agent.mdrnn.hidden_size, params=book.params)


@pytest.fixture(scope="module")
def exported(book, starts, controller, tmp_path_factory):
    return export_web_models(book.agent.vae, book.agent.mdrnn, *starts, tmp_path_factory.mktemp("web"), start=3, controller=controller)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _half(module):
    """A copy of `module` whose weights are rounded to float16, as the ONNX files store them."""
    module = copy.deepcopy(module)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def test_decoder_matches_pytorch_within_one_level_per_pixel(book, exported):
    z = torch.randn(10, 32, generator=torch.Generator().manual_seed(0)) * 1.5
    with torch.no_grad():
        expected = book.agent.vae.decode(z).permute(0, 2, 3, 1).numpy()
    (got,) = _session(exported.decoder).run(None, {"z": z.numpy()})
    assert got.shape == (10, 64, 64, 3)
    diff = np.abs(got - expected).max()
    print(f"decoder: largest absolute difference {diff:.2e} (float in [0, 1]) on 10 random z")
    assert diff < 1e-4
    pixels = lambda x: np.round(x * 255).astype(int)  # noqa: E731
    assert np.abs(pixels(got) - pixels(expected)).max() <= 1


def test_dream_step_matches_pytorch(book, controller, exported):
    g = torch.Generator().manual_seed(1)
    b, z_size, hidden = 16, 32, book.agent.mdrnn.hidden_size
    z, a = torch.randn(b, z_size, generator=g), torch.rand(b, 3, generator=g) * 2 - 1
    h, c = torch.randn(b, hidden, generator=g) * 0.3, torch.randn(b, hidden, generator=g) * 0.3
    u, eps = torch.rand(b, z_size, generator=g), torch.randn(b, z_size, generator=g)
    tau = torch.tensor([1.15])
    session = _session(exported.dream_step)
    for autopilot in (0.0, 1.0):
        feeds = dict(z=z, action=a, h=h, c=c, tau=tau, u=u, eps=eps, autopilot=torch.tensor([autopilot]))
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        # M's weights are stored as float16 in the file; C's 867 are graph constants, kept float32
        largest = {}
        for name, mdrnn, ctrl in (("float16 weights", _half(book.agent.mdrnn), controller), ("float32 weights", book.agent.mdrnn, controller)):
            with torch.no_grad():
                action = ctrl(z, h) if autopilot else a
                out, (h1, c1) = mdrnn.step(z, action, (h, c))
                z1 = sample_from_noise(out.logpi, out.mu, out.logsigma, tau, u, eps)
            expected = [z1, h1, c1, out.reward, torch.sigmoid(out.done_logit), action]
            largest[name] = max(float(np.abs(x - y.numpy()).max()) for x, y in zip(got, expected))
        print(f"dream step (autopilot {autopilot:g}): largest absolute difference {largest}")
        assert largest["float16 weights"] < 1e-4
        assert [x.shape for x in got] == [(b, z_size), (b, hidden), (b, hidden), (b,), (b,), (b, 3)]
    assert [i.name for i in session.get_inputs()][-1] == "autopilot"


def test_sample_from_noise_inverts_the_mixture_weights():
    logpi = torch.log(torch.tensor([[[0.2, 0.3, 0.5]]]))
    mu = torch.tensor([[[10.0, 20.0, 30.0]]])
    logsigma = torch.zeros(1, 1, 3)
    eps, one = torch.zeros(1, 1), torch.ones(1)
    picks = [float(sample_from_noise(logpi, mu, logsigma, one, torch.tensor([[u]]), eps)) for u in (0.0, 0.19, 0.21, 0.49, 0.51, 0.999)]
    assert picks == [10.0, 10.0, 20.0, 20.0, 30.0, 30.0]
    assert float(sample_from_noise(logpi, mu, logsigma, torch.tensor([4.0]), torch.tensor([[0.1]]), torch.ones(1, 1))) == 12.0


def test_sample_from_noise_follows_the_temperature():
    """At a low temperature the heaviest component wins; the draws' spread scales with sqrt(tau)."""
    m = MDRNN(z_size=4, hidden_size=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out, _ = m.step(torch.randn(1, 4, generator=g), torch.zeros(1, 3))
    u = torch.rand(1, 4, generator=g)
    cold = sample_from_noise(out.logpi, out.mu, out.logsigma, torch.tensor([1e-3]), u, torch.zeros(1, 4))
    heaviest = out.mu.gather(-1, out.logpi.argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.equal(cold, heaviest)


def test_metadata_names_the_dimensions_v_uses(exported, starts):
    meta = json.loads((exported.folder / META_FILE).read_text())
    assert meta == exported.meta
    assert meta["dims"] == [d for d, kl in enumerate(meta["kl"]) if kl > meta["kl_threshold"]]
    assert meta["dims"] == used_dimensions(torch.as_tensor(starts[0]), torch.as_tensor(starts[1]), 0.1)
    assert 0 < len(meta["dims"]) < 32
    assert meta["z_start"] == [float(x) for x in starts[0][3]]
    assert all(lo <= -3 and hi >= 3 for lo, hi in zip(meta["low"], meta["high"]))


def test_weights_are_stored_as_float16(exported):
    import onnx

    model = onnx.load(str(exported.folder / DECODER_FILE))
    big = [i for i in model.graph.initializer if np.prod(i.dims) >= 16]
    assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)
    print(f"page weight: {exported.size_bytes() / 1e6:.2f} MB")


def test_bad_latents_are_refused(book, tmp_path):
    with pytest.raises(ValueError, match=r"mu and logvar must both be \(N, 32\)"):
        export_web_models(book.agent.vae, book.agent.mdrnn, np.zeros((4, 8)), np.zeros((4, 8)), tmp_path)
    with pytest.raises(ValueError, match=r"start must be in \[0, 4\)"):
        export_web_models(book.agent.vae, book.agent.mdrnn, np.zeros((4, 32)), np.zeros((4, 32)), tmp_path, start=4)
