"""V's decoder and M's dream step as ONNX models, for the reader's browser (onnxruntime-web).

Two graphs, written by :func:`export_web_models` into one folder next to the book's pages:

* ``decoder.onnx``: latent codes ``z`` (N, Z) -> frames (N, 64, 64, 3), float in [0, 1],
  channels last (the order of a canvas' pixels).
* ``dream_step.onnx``: one step of M from ``(z, action, h, c)`` with its mixture sampled at
  temperature ``tau``. The random numbers are inputs (``u`` uniform in [0, 1) picks each
  dimension's component by inverting the mixture's cumulative weights, ``eps`` standard
  normal), so the browser draws them and the graph itself is deterministic. Outputs the
  next ``z``, the new ``(h, c)`` and M's predicted reward and probability that the episode
  ends (zeros where M has no such head). Exported with a controller C, it also takes
  ``autopilot`` (1,): at 1 the step drives with C's action ``C(z, h)`` instead of ``action``,
  and it outputs the action taken (``action_taken``, (B, 3)).

Their weights are stored as float16 (each cast back to float32 inside the graph, so the
arithmetic stays float32), and ``web_models.json`` tells the page what it needs: the
sizes, the dimensions V uses (their KL, averaged over real frames, above a threshold), a
real frame's code to start from and the range of each dimension's sliders.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodels.controller import Controller
from worldmodels.mdrnn import MDRNN
from worldmodels.runs import atomic_path, write_json
from worldmodels.vae import VAE, kl_per_dimension

DECODER_FILE = "decoder.onnx"
DREAM_STEP_FILE = "dream_step.onnx"
META_FILE = "web_models.json"
OPSET = 18


class WebDecoder(nn.Module):
    """V's decoder with channels-last output: ``z`` (N, Z) -> frames (N, 64, 64, 3) in [0, 1]."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).permute(0, 2, 3, 1)


class WebDreamStep(nn.Module):
    """One step of M with its mixture sampled from given noise (see the module's docstring).

    ``forward(z, action, h, c, tau, u, eps)`` with ``z``, ``u``, ``eps`` (B, Z), ``action``
    (B, 3), ``h``, ``c`` (B, H) and ``tau`` (1,) returns ``(z_next, h, c, reward, done)``,
    the last two (B,). With a `controller` it takes ``autopilot`` (1,) too and also returns
    the action taken, ``action + autopilot * (controller(z, h) - action)``.
    """

    def __init__(self, mdrnn: MDRNN, controller: Controller | None = None):
        super().__init__()
        self.mdrnn = mdrnn
        self.controller = controller

    def forward(self, z: Tensor, action: Tensor, h: Tensor, c: Tensor, tau: Tensor, u: Tensor, eps: Tensor, autopilot: Tensor | None = None):
        if self.controller is not None:
            action = action + autopilot * (self.controller(z, h) - action)
        out, (h_next, c_next) = self.mdrnn.step(z, action, (h, c))
        z_next = sample_from_noise(out.logpi, out.mu, out.logsigma, tau, u, eps)
        zeros = torch.zeros_like(h[:, 0])
        reward = out.reward if out.reward is not None else zeros
        done = torch.sigmoid(out.done_logit) if out.done_logit is not None else zeros
        if self.controller is not None:
            return z_next, h_next, c_next, reward, done, action
        return z_next, h_next, c_next, reward, done


def sample_from_noise(logpi: Tensor, mu: Tensor, logsigma: Tensor, tau: Tensor, u: Tensor, eps: Tensor) -> Tensor:
    """M's mixtures (..., Z, K) sampled at temperature ``tau`` from uniform ``u`` and normal ``eps`` (..., Z).

    The draw of :func:`worldmodels.mdrnn.sample_next_z`, with its randomness given: per
    dimension, the component is the first whose cumulative weight (of ``softmax(logpi /
    tau)``) exceeds ``u``; then ``z = mu + sigma * sqrt(tau) * eps``.
    """
    k = logpi.shape[-1]
    cumulative = torch.cumsum(F.softmax(logpi / tau, dim=-1), dim=-1)
    index = (cumulative <= u.unsqueeze(-1)).sum(-1, keepdim=True).clamp(max=k - 1)
    pick = (torch.arange(k, device=mu.device) == index).to(mu.dtype)
    mean = (pick * mu).sum(-1)
    sigma = (pick * logsigma).sum(-1).exp()
    return mean + sigma * torch.sqrt(tau) * eps


def _store_float16(path: Path) -> None:
    """Rewrite an ONNX file so that its float32 weights are stored as float16, cast back on load."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or np.prod(init.dims) < 16:
            continue
        array = numpy_helper.to_array(init)
        name = init.name
        init.CopyFrom(numpy_helper.from_array(array.astype(np.float16), name + "_float16"))
        casts.append(helper.make_node("Cast", [name + "_float16"], [name], to=TensorProto.FLOAT))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str], dynamic: dict) -> None:
    with atomic_path(path) as tmp:
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    _store_float16(path)


@dataclass
class WebModels:
    """What :func:`export_web_models` wrote."""

    folder: Path
    meta: dict
    """The contents of ``web_models.json``."""

    @property
    def decoder(self) -> Path:
        return self.folder / DECODER_FILE

    @property
    def dream_step(self) -> Path:
        return self.folder / DREAM_STEP_FILE

    def size_bytes(self) -> int:
        """The bytes a page downloads for both models and their metadata."""
        return sum((self.folder / f).stat().st_size for f in (DECODER_FILE, DREAM_STEP_FILE, META_FILE) if (self.folder / f).exists())


def used_dimensions(mu: Tensor, logvar: Tensor, threshold: float = 0.1) -> list[int]:
    """The latent dimensions whose KL (nats, averaged over frames) exceeds `threshold`: those V uses."""
    kl = kl_per_dimension(mu.float(), logvar.float())
    return [int(d) for d in torch.nonzero(kl > threshold).flatten()]


@torch.no_grad()
def export_web_models(
    vae: VAE,
    mdrnn: MDRNN | None,
    mu: np.ndarray,
    logvar: np.ndarray,
    folder: str | Path,
    start: int = 0,
    kl_threshold: float = 0.1,
    controller: Controller | None = None,
) -> WebModels:
    """Write V's decoder and M's dream step as ONNX (float16 weights) and ``web_models.json`` to `folder`.

    Without `mdrnn` only the decoder is written (for the latent explorer). With a
    `controller` (:class:`worldmodels.controller.Controller`), the dream step can let it drive.

    ``mu`` and ``logvar`` (N, Z) are V's posteriors of real frames: they give the KL per
    dimension (the dimensions used are those above `kl_threshold` nats), each dimension's
    slider range (its codes' mean +- 3 standard deviations, at least [-3, 3]) and the code
    of frame `start`, where the explorer and the dream begin.
    """
    mu_t, logvar_t = torch.as_tensor(np.asarray(mu, np.float32)), torch.as_tensor(np.asarray(logvar, np.float32))
    if mu_t.ndim != 2 or mu_t.shape[1] != vae.z_size or mu_t.shape != logvar_t.shape:
        raise ValueError(f"mu and logvar must both be (N, {vae.z_size}), got {tuple(mu_t.shape)} and {tuple(logvar_t.shape)}")
    if not 0 <= start < len(mu_t):
        raise ValueError(f"start must be in [0, {len(mu_t)}), got {start}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae = copy.deepcopy(vae).float().cpu().eval()
    z_size = vae.z_size
    _export(WebDecoder(vae), (torch.zeros(1, z_size),), folder / DECODER_FILE, ["z"], ["frame"], {"z": {0: "n"}, "frame": {0: "n"}})
    if mdrnn is not None:
        mdrnn = copy.deepcopy(mdrnn).float().cpu().eval()
        z, h = torch.zeros(1, z_size), torch.zeros(1, mdrnn.hidden_size)
        args = (z, torch.zeros(1, 3), h, h, torch.ones(1), torch.full((1, z_size), 0.5), z)
        names = ["z", "action", "h", "c", "tau", "u", "eps"]
        outputs = ["z_next", "h_next", "c_next", "reward", "done"]
        if controller is not None:
            controller = Controller.from_shape(controller.shape, controller.to_flat(), dtype=torch.float32)
            args, names, outputs = args + (torch.zeros(1),), names + ["autopilot"], outputs + ["action_taken"]
        dynamic = {n: {0: "batch"} for n in names + outputs if n not in ("tau", "autopilot")}
        _export(WebDreamStep(mdrnn, controller), args, folder / DREAM_STEP_FILE, names, outputs, dynamic)
    kl = kl_per_dimension(mu_t, logvar_t)
    spread = mu_t.std(0)
    centre = mu_t.mean(0)
    meta = {
        "z_size": z_size,
        "hidden_size": mdrnn.hidden_size if mdrnn is not None else None,
        "n_gaussians": mdrnn.n_gaussians if mdrnn is not None else None,
        "kl_threshold": kl_threshold,
        "kl": [round(float(x), 4) for x in kl],
        "dims": used_dimensions(mu_t, logvar_t, kl_threshold),
        "low": [round(float(min(-3.0, m - 3 * s)), 3) for m, s in zip(centre, spread)],
        "high": [round(float(max(3.0, m + 3 * s)), 3) for m, s in zip(centre, spread)],
        "z_start": [float(x) for x in mu_t[start]],
        "reward_head": mdrnn is not None and mdrnn.reward_head is not None,
        "done_head": mdrnn is not None and mdrnn.done_head is not None,
        "controller": mdrnn is not None and controller is not None,
    }
    write_json(folder / META_FILE, meta)
    return WebModels(folder, json.loads((folder / META_FILE).read_text()))
