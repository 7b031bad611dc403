"""C: the controller that maps V's ``z`` (and M's ``h``) to an action.

Three kinds, selected by ``cfg.controller.kind``:

* ``'zh'``: the paper's linear controller ``a = W [z, h] + b`` (867 parameters for
  z = 32, h = 256);
* ``'z'``: V only, ``a = W z + b`` (99 parameters);
* ``'z_hidden'``: V only with one tanh hidden layer, ``a = W2 tanh(W1 z + b1) + b2``
  (1,443 parameters with 40 hidden units).

The raw outputs are squashed into CarRacing's action box as in the authors' code
(:func:`squash`). CMA-ES searches over *flat* parameter vectors; the layout of a flat
vector is, layer after layer, the weight matrix of shape (out, in) in row-major order,
then the bias (out,). For ``'zh'`` the input columns are ``[z, h]`` in that order.

A :class:`Controller` holds K flat vectors and applies them to K environments in one
batched matrix product, which is how rollouts and dreams evaluate a whole population at
once; a single controller is the case K = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from worldmodels.config import Config

KINDS = ("zh", "z", "z_hidden")
ACTION_SIZE = 3


@dataclass(frozen=True)
class ControllerShape:
    """What fixes a controller's parameter layout: its kind and the sizes of its inputs."""

    kind: str = "zh"
    z_size: int = 32
    hidden_size: int = 256
    """M's hidden state size (used by 'zh' only)."""
    hidden_units: int = 40
    """Units of the tanh hidden layer (used by 'z_hidden' only)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"controller kind must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")

    @classmethod
    def from_config(cls, cfg: Config) -> ControllerShape:
        return cls(cfg.controller.kind, cfg.vae.z_size, cfg.mdrnn.hidden_size, cfg.controller.hidden_units)

    @property
    def input_size(self) -> int:
        return self.z_size + self.hidden_size if self.kind == "zh" else self.z_size

    @property
    def uses_h(self) -> bool:
        return self.kind == "zh"

    def layers(self) -> list[tuple[int, int]]:
        """(out, in) of each linear layer, in the order of the flat vector."""
        if self.kind == "z_hidden":
            return [(self.hidden_units, self.z_size), (ACTION_SIZE, self.hidden_units)]
        return [(ACTION_SIZE, self.input_size)]

    @property
    def n_params(self) -> int:
        return sum(o * i + o for o, i in self.layers())

    def metadata(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "z_size": str(self.z_size),
            "hidden_size": str(self.hidden_size),
            "hidden_units": str(self.hidden_units),
        }


def n_params(kind: str, z_size: int = 32, hidden_size: int = 256, hidden_units: int = 40) -> int:
    """Number of parameters of a controller: 867 ('zh'), 99 ('z'), 1,443 ('z_hidden') at the paper's sizes."""
    return ControllerShape(kind, z_size, hidden_size, hidden_units).n_params


def squash(raw: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Raw outputs (..., 3) to CarRacing actions: steer = tanh, gas = (tanh + 1) / 2, brake = clip(tanh, 0, 1).

    The result lies in [-1, 1] x [0, 1] x [0, 1]. Accepts a tensor or a NumPy array and
    returns the same type.
    """
    if isinstance(raw, np.ndarray):
        return squash(torch.from_numpy(raw)).numpy()
    t = torch.tanh(raw)
    return torch.stack([t[..., 0], (t[..., 1] + 1.0) * 0.5, t[..., 2].clamp(0.0, 1.0)], dim=-1)


def _split(flat: Tensor, shape: ControllerShape) -> list[tuple[Tensor, Tensor]]:
    """Cut flat vectors (..., P) into per-layer (weight (..., out, in), bias (..., out))."""
    if flat.shape[-1] != shape.n_params:
        raise ValueError(
            f"a {shape.kind!r} controller with z={shape.z_size}, h={shape.hidden_size}, "
            f"hidden_units={shape.hidden_units} has {shape.n_params} parameters, got a vector of {flat.shape[-1]}"
        )
    lead, out, start = flat.shape[:-1], [], 0
    for o, i in shape.layers():
        w = flat[..., start : start + o * i].reshape(*lead, o, i)
        start += o * i
        b = flat[..., start : start + o]
        start += o
        out.append((w, b))
    return out


class Controller:
    """K controllers of one shape, each with its own flat parameter vector, applied in one batched
    product: ``ctrl(z, h)`` with ``z`` (K, Z) and ``h`` (K, H) (None for the V-only kinds) returns
    squashed actions (K, 3). A single controller is K = 1.

    With ``index`` (an integer array of n of the K rows, or a slice) only those controllers act,
    on inputs of n rows: rollouts use it to skip the environments that have finished. A single
    controller (K = 1) acts on any number of input rows. The weights are
    held in `dtype` (float32, or float64 for the evaluation's exact driving; inputs must match)
    on `device` (the dream's, say; inputs must be there too).

    >>> Controller("zh").set_flat(np.zeros(867))(torch.zeros(1, 32), torch.zeros(1, 256))
    tensor([[0.0000, 0.5000, 0.0000]])
    """

    def __init__(
        self,
        kind: str = "zh",
        z_size: int = 32,
        hidden_size: int = 256,
        hidden_units: int = 40,
        *,
        params: np.ndarray | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.shape = ControllerShape(kind, z_size, hidden_size, hidden_units)
        self.dtype = dtype
        self.device = torch.device(device)
        self._layers: list[tuple[Tensor, Tensor]] = []
        if params is not None:
            self.set_flat(params)

    @classmethod
    def from_shape(
        cls,
        shape: ControllerShape,
        params: np.ndarray | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Controller:
        return cls(
            shape.kind, shape.z_size, shape.hidden_size, shape.hidden_units, params=params, dtype=dtype, device=device
        )

    @classmethod
    def from_config(cls, cfg: Config, params: np.ndarray | None = None) -> Controller:
        return cls.from_shape(ControllerShape.from_config(cfg), params)

    @property
    def kind(self) -> str:
        return self.shape.kind

    @property
    def n_params(self) -> int:
        """Parameters of one controller."""
        return self.shape.n_params

    def __len__(self) -> int:
        return self._layers[0][0].shape[0] if self._layers else 0

    def set_flat(self, params: np.ndarray) -> Controller:
        """Take K flat parameter vectors (K, P), or one (P,); returns self."""
        flat = torch.as_tensor(np.asarray(params), dtype=self.dtype, device=self.device)
        if flat.ndim not in (1, 2):
            raise ValueError(f"params must be (P,) or (K, P), got shape {tuple(flat.shape)}")
        layers = _split(flat.reshape(-1, flat.shape[-1]), self.shape)
        # Contiguous copies: one (K, out, in) weight and one (K, out, 1) bias per layer.
        self._layers = [(w.contiguous(), b.unsqueeze(-1).contiguous()) for w, b in layers]
        self.single = len(self._layers[0][0]) == 1
        return self

    def to_flat(self) -> np.ndarray:
        """The parameters as float64 flat vectors (K, P), the inverse of :meth:`set_flat`."""
        parts = [t.flatten(1) for layer in self._layers for t in layer]
        return torch.cat(parts, dim=1).double().cpu().numpy()

    def __call__(self, z: Tensor, h: Tensor | None = None, index: np.ndarray | slice | None = None) -> Tensor:
        if not self._layers:
            raise RuntimeError("Controller: call set_flat first")
        x = torch.cat([z, h], dim=-1) if self.shape.uses_h else z
        x = x.unsqueeze(-1)  # (n, in, 1)
        for j, (w, b) in enumerate(self._layers):
            if index is not None:
                w, b = w[index], b[index]
            elif self.single:  # one controller, acting on every row of the inputs
                w, b = w.expand(x.shape[0], -1, -1), b.expand(x.shape[0], -1, -1)
            x = torch.baddbmm(b, w, x)
            if j < len(self._layers) - 1:
                x = torch.tanh(x)
        return squash(x.squeeze(-1))


class SavedController(NamedTuple):
    """A controller read back by :func:`load_controller`."""

    params: np.ndarray
    """The flat parameter vector (P,), float64."""
    shape: ControllerShape
    metadata: dict[str, str]
    """Everything stored in the file's metadata (the shape's fields and any extras)."""


def save_controller(
    path: str | Path, params: np.ndarray, shape: ControllerShape, metadata: dict[str, str] | None = None
) -> None:
    """Write a flat parameter vector to a safetensors file (atomically), its kind and sizes in the metadata.

    `metadata` may add string entries (for example the generation and the fitness).
    """
    from worldmodels.runs import save_tensors

    params = np.asarray(params, dtype=np.float64).reshape(-1)
    if params.shape[0] != shape.n_params:
        raise ValueError(f"{shape} has {shape.n_params} parameters, got {params.shape[0]}")
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta.update(shape.metadata())
    save_tensors(path, {"params": torch.from_numpy(params)}, metadata=meta)


def load_controller(path: str | Path) -> SavedController:
    """Read a file written by :func:`save_controller`; any other file raises DamagedFileError naming it."""
    from worldmodels.runs import DamagedFileError, load_tensors, weights_metadata

    tensors, meta = load_tensors(path), weights_metadata(path)
    try:
        params = tensors["params"].double().numpy()
        shape = ControllerShape(meta["kind"], int(meta["z_size"]), int(meta["hidden_size"]), int(meta["hidden_units"]))
    except KeyError as e:
        raise DamagedFileError(f"{path}: not a controller file (it lacks {e})") from e
    if params.shape[0] != shape.n_params:
        raise DamagedFileError(f"{path}: {params.shape[0]} parameters, but {shape} needs {shape.n_params}")
    return SavedController(params, shape, meta)
