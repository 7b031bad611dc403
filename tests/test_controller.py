import numpy as np
import pytest
import torch

from worldmodels.config import preset
from worldmodels.controller import (
    BatchedController,
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
        model = Controller(kind)
        assert sum(p.numel() for p in model.parameters()) == model.n_params == expected


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
    v = np.random.default_rng(0).normal(size=shape.n_params).astype(np.float32).astype(np.float64)
    c = Controller.from_flat(v, kind)
    np.testing.assert_array_equal(c.to_flat(), v)
    np.testing.assert_array_equal(Controller(kind).set_flat(c.to_flat()).to_flat(), v)


def test_flat_layout_weight_then_bias():
    shape = ControllerShape("z", 4, 0, 40)
    v = np.arange(shape.n_params, dtype=np.float64)
    c = Controller.from_flat(v, "z", 4, 0)
    np.testing.assert_array_equal(c.layers[0].weight.detach().numpy(), v[:12].reshape(3, 4))
    np.testing.assert_array_equal(c.layers[0].bias.detach().numpy(), v[12:])


def test_wrong_vector_length():
    with pytest.raises(ValueError, match="867"):
        Controller.from_flat(np.zeros(866))


@pytest.mark.parametrize("kind", ["zh", "z", "z_hidden"])
def test_batched_equals_single(kind):
    shape = ControllerShape(kind, 32, 256, 40)
    rng = np.random.default_rng(1)
    k = 5
    params = rng.normal(0, 0.3, (k, shape.n_params))
    z = torch.randn(k, 32)
    h = torch.randn(k, 256) if kind == "zh" else None
    batched = BatchedController(shape, params)
    actions = batched(z, h)
    assert actions.shape == (k, 3)
    for i in range(k):
        single = Controller.from_flat(params[i], kind)
        expected = single(z[i : i + 1], h[i : i + 1] if h is not None else None)
        torch.testing.assert_close(actions[i : i + 1], expected, rtol=1e-5, atol=1e-6)
    # a subset of the controllers, on the rows of the environments still running
    index = np.array([1, 3])
    sub = batched(z[index], h[index] if h is not None else None, index)
    torch.testing.assert_close(sub, actions[index], rtol=1e-5, atol=1e-6)


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
