import numpy as np
import pytest
import torch

from worldmodels.config import preset
from worldmodels.controller import (
    Controller,
    ControllerShape,
    load_controller,
    n_params,
    save_controller,
    squash,
)


def test_parameter_counts_match_paper():
    assert n_params("zh", 32, 256) == 867
    assert n_params("z", 32, 256) == 99
    assert n_params("z_hidden", 32, 256, 40) == 32 * 40 + 40 + 40 * 3 + 3 == 1_443
    for kind, expected in (("zh", 867), ("z", 99), ("z_hidden", 1_443)):
        controller = Controller(kind).set_flat(np.zeros(expected))
        assert controller.n_params == expected and controller.to_flat().shape == (1, expected) and len(controller) == 1


def test_parameter_count_from_config():
    cfg = preset("paper")
    assert ControllerShape.from_config(cfg).n_params == 867
    assert ControllerShape.from_config(cfg.replace(**{"controller.kind": "z_hidden"})).n_params == 1_443


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        n_params("zz")


def test_squash_ranges_on_extreme_inputs():
    raw = torch.tensor([[1e9, 1e9, 1e9], [-1e9, -1e9, -1e9], [0.0, 0.0, 0.0], [float("inf"), -float("inf"), 3.0]])
    a = squash(raw)
    assert torch.equal(a[0], torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(a[1], torch.tensor([-1.0, 0.0, 0.0]))
    assert torch.equal(a[2], torch.tensor([0.0, 0.5, 0.0]))
    assert torch.equal(a[3, :2], torch.tensor([1.0, 0.0]))
    big = torch.randn(10_000, 3) * 100
    a = squash(big)
    assert a[:, 0].min() >= -1 and a[:, 0].max() <= 1
    assert a[:, 1:].min() >= 0 and a[:, 1:].max() <= 1
    np.testing.assert_array_equal(squash(big.numpy()), a.numpy())


@pytest.mark.parametrize("kind", ["zh", "z", "z_hidden"])
def test_flat_round_trip(kind):
    shape = ControllerShape(kind, 32, 256, 40)
    v = np.random.default_rng(0).normal(size=(3, shape.n_params)).astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(Controller(kind).set_flat(v).to_flat(), v)
    np.testing.assert_array_equal(Controller(kind, dtype=torch.float64).set_flat(v[0]).to_flat(), v[:1])


def test_flat_layout_weight_then_bias():
    shape = ControllerShape("z", 4, 0, 40)
    v = np.arange(shape.n_params, dtype=np.float64) / 10
    z = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    raw = z.numpy() @ v[:12].reshape(3, 4).T + v[12:]
    actions = Controller("z", 4, 0, dtype=torch.float64).set_flat(v)(z)
    np.testing.assert_allclose(actions.numpy(), squash(raw), rtol=1e-12)


def test_wrong_vector_length():
    with pytest.raises(ValueError, match="867"):
        Controller().set_flat(np.zeros(866))
    with pytest.raises(ValueError, match=r"\(P,\) or \(K, P\)"):
        Controller().set_flat(np.zeros((1, 1, 867)))


def _single(params: np.ndarray, kind: str, z: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """What the single (``nn.Linear``) controller this project had before gave: squash(W [z, h] + b)."""
    shape = ControllerShape(kind, 32, 256, 40)
    x, start, layers = (torch.cat([z, h], -1) if kind == "zh" else z), 0, shape.layers()
    for j, (o, i) in enumerate(layers):
        w = torch.as_tensor(params[start : start + o * i], dtype=torch.float32).reshape(o, i)
        b = torch.as_tensor(params[start + o * i : start + o * i + o], dtype=torch.float32)
        start += o * i + o
        x = torch.nn.functional.linear(x, w, b)
        if j < len(layers) - 1:
            x = torch.tanh(x)
    return squash(x)


@pytest.mark.parametrize("kind", ["zh", "z", "z_hidden"])
def test_one_controller_and_a_batch_of_them_equal_the_single_controller(kind):
    shape = ControllerShape(kind, 32, 256, 40)
    rng = np.random.default_rng(1)
    k = 5
    params = rng.normal(0, 0.3, (k, shape.n_params))
    # Inputs from rng, not torch's global generator, whose state depends on the tests run before.
    z = torch.from_numpy(rng.standard_normal((k, 32), dtype=np.float32))
    h = torch.from_numpy(rng.standard_normal((k, 256), dtype=np.float32)) if kind == "zh" else None
    batched = Controller(kind, params=params)
    actions = batched(z, h)
    assert actions.shape == (k, 3) and len(batched) == k
    for i in range(k):
        rows = slice(i, i + 1)
        expected = _single(params[i], kind, z[rows], h[rows] if h is not None else None)
        one = Controller(kind).set_flat(params[i])(z[rows], h[rows] if h is not None else None)
        torch.testing.assert_close(one, expected, rtol=1e-6, atol=1e-6)  # K = 1: the single controller
        torch.testing.assert_close(actions[rows], one, rtol=1e-6, atol=1e-6)
    # a subset of the controllers, on the rows of the environments still running
    index = np.array([1, 3])
    sub = batched(z[index], h[index] if h is not None else None, index)
    torch.testing.assert_close(sub, actions[index], rtol=1e-6, atol=1e-6)


def test_save_load(tmp_path):
    shape = ControllerShape("z_hidden", 32, 256, 40)
    v = np.random.default_rng(2).normal(size=shape.n_params)
    path = tmp_path / "controller" / "best.safetensors"
    save_controller(path, v, shape, metadata={"generation": 7})
    saved = load_controller(path)
    np.testing.assert_array_equal(saved.params, v)
    assert saved.shape == shape
    assert saved.metadata["generation"] == "7"
    with pytest.raises(ValueError):
        save_controller(path, v[:-1], shape)
