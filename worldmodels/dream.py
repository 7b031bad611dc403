"""M's dream: the MDN-RNN with its reward and done heads as a batched environment.

In the dream there is no CarRacing and no V: the state is M's latent ``z`` and its LSTM
state. One step takes the controllers' actions, advances M, and *samples* the next latent
from M's mixtures at a temperature ``tau`` (:func:`worldmodels.mdrnn.sample_next_z`); the
reward is M's reward head and the episode ends when a coin with M's done probability
comes up (or after ``max_steps``). Higher ``tau`` makes the dream more uncertain, which
keeps the controller from exploiting M's mistakes (the paper's VizDoom experiment:
``tau = 0.1`` scored 193 in the real game, ``tau = 1.15`` scored 1092).

A whole generation, ``dream.population`` x ``dream.episodes_per_candidate`` dreams (the
paper's 64 x 16, whatever the real evolution's ``cma`` population), runs as one tensor
batch on ``resolve_device(cfg.device)``: one ``(B, Z)`` latent, one LSTM state, one
:class:`~worldmodels.controller.Controller` call per step, and no wait for the device
inside the loop but a check for the end every :data:`DONE_CHECK_EVERY` steps.

**Choosing tau.** :func:`temperature_table` trains a controller in the dream at each
temperature and scores it on real *validation* tracks (:func:`real_validation_seeds`),
the paper's Doom table for CarRacing; the evaluation tracks only score the chosen one.
:func:`dream_real_correlation` asks whether the dream ranks candidates as the real track
does: K controllers, their dream and real returns, Pearson and Spearman over them.

**Initial latents.** A dream starts from a real latent: the posterior of V at frame
:data:`INITIAL_FRAME` (50) of a collected episode, just after CarRacing's zoom-in
animation (frames 0-49 show the track zooming in, which a controller never acts on).
Episode and posterior noise are drawn from the dream's seed, so the same seed gives
the same start for every candidate (common random numbers, as in the real environment).
A run without the encoded dataset (a shipped one) keeps these start latents in a small
file, :data:`STARTS_FILE`, so that dreams need neither the dataset nor its latents.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from worldmodels.config import CARRACING_MAX_STEPS, CMA_VALIDATION_OFFSET, CMAConfig, Config, DreamConfig, resolve_device
from worldmodels.controller import Controller, ControllerShape, load_controller, save_controller
from worldmodels.data import EpisodeError, dataset_episodes
from worldmodels.evolution import EvolutionResult, evolve, is_finished
from worldmodels.mdrnn import MDRNN
from worldmodels.parallel import InlineExecutor, cpu_count, one_torch_thread
from worldmodels.runs import (
    BEST_WEIGHTS, DONE_FILE, DREAM_STARTS, DREAM_SUMMARY, ES_CHECKPOINT, RunDir, RunDirError, as_run_dir, load_mdrnn, load_vae, open_npz, read_json,
    save_npz, write_json,
)
from worldmodels.tasks import Task, make_tasks
from worldmodels.vae import frames_to_tensor

INITIAL_FRAME = 50
"""Dreams start from the latent of this frame of a real episode (after the zoom-in)."""


def check_temperature(tau: float) -> float:
    """`tau` as a float, or ValueError unless it is finite and > 0."""
    tau = float(tau)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"temperature tau must be a finite number > 0, got {tau}")
    return tau


DONE_CHECK_EVERY = 50
""":func:`dream_rollout` asks whether every dream has ended once every this many steps: each
ask waits for the device; in between, the loop queues a GPU's work without waiting for it."""

THREADED_BATCH = 256
"""With ``dream.threads = 0``, a batch of at least this many dreams on the CPU runs in one
slice per core (see :func:`dream_rollout`), a smaller one in one piece (meeting costs more
than it saves)."""


class _FusedM(NamedTuple):
    """M's step as two matrix products, its weights laid out once for the dream's loop."""

    gates_weight: Tensor
    """(Z + A + H, 4H): the LSTM's input and recurrent weights over ``[z, a, h]``, gates in the
    order i, f, o, g, the g gate's doubled: one sigmoid of all four gives ``tanh(g) = 2 sigmoid(2 g) - 1``."""
    gates_bias: Tensor
    """(4H,): the LSTM's one bias vector (the last input column of ``weight_ih``), laid out alike."""
    heads_weight: Tensor
    """(H, 3 K Z + 2): mixture logits (divided by tau), means and log-sigmas, each component-major
    (K blocks of Z columns, so that a reduction over the components is K - 1 element-wise
    operations), then reward and done."""
    heads_bias: Tensor
    """(3 K Z + 2,)."""


def _fuse(mdrnn: MDRNN, tau: float) -> _FusedM:
    """``_FusedM`` of `mdrnn` at temperature `tau` (a missing done head reads as logit 0; the dream ignores it)."""
    z, k, h = mdrnn.z_size, mdrnn.n_gaussians, mdrnn.hidden_size
    w_ih, w_hh = mdrnn.lstm.weight_ih_l0.detach(), mdrnn.lstm.weight_hh_l0.detach()
    order = torch.arange(4 * h, device=w_ih.device).view(4, h)[[0, 1, 3, 2]].reshape(-1)  # i, f, g, o -> i, f, o, g
    scale = torch.ones(4 * h, 1, device=w_ih.device, dtype=w_ih.dtype)
    scale[3 * h :] = 2.0
    gates = torch.cat([w_ih, w_hh], dim=1)[order] * scale
    gates_weight = torch.cat([gates[:, : z + mdrnn.action_size], gates[:, z + mdrnn.action_size + 1 :]], dim=1)
    gates_bias = gates[:, z + mdrnn.action_size]
    # M's output layer is, per latent dimension, [K logits, K means, K log-sigmas]: regroup as
    # (kind, component, dimension).
    mdn_weight = mdrnn.mdn.weight.detach().view(z, 3, k, h).permute(1, 2, 0, 3).reshape(3, k * z, h)
    mdn_bias = mdrnn.mdn.bias.detach().view(z, 3, k).permute(1, 2, 0).reshape(3, k * z)
    mdn_weight, mdn_bias = mdn_weight.clone(), mdn_bias.clone()
    mdn_weight[0] /= tau
    mdn_bias[0] /= tau
    heads_w, heads_b = [mdn_weight.reshape(3 * k * z, h)], [mdn_bias.reshape(-1)]
    for head in (mdrnn.reward_head, mdrnn.done_head):
        heads_w.append(head.weight.detach() if head is not None else mdn_weight.new_zeros(1, h))
        heads_b.append(head.bias.detach() if head is not None else mdn_bias.new_zeros(1))
    return _FusedM(gates_weight.T.contiguous(), gates_bias.contiguous(), torch.cat(heads_w).T.contiguous(),
                   torch.cat(heads_b).contiguous())


class DreamEnv:
    """M as a batched environment of K dreams.

    >>> env = DreamEnv(mdrnn, temperature=1.15, max_steps=1000)
    >>> z, h = env.reset(initial_z, generator)          # (K, Z), (K, H)
    >>> z, reward, done, h = env.step(actions)          # actions (K, 3)

    ``done[k]`` is True from the step at which dream k ends; after that its reward is
    0 (the batch keeps its shape, finished dreams are simply ignored). Everything random
    (next latents, ends) is drawn from the `generator` given to :meth:`reset`, so a seeded
    generator replays the same dream.

    Everything lives on M's device, in M's dtype. A step is M's LSTM cell and heads as two
    matrix products (``_FusedM``) and the draw of :func:`worldmodels.mdrnn.sample_next_z`
    by inverse CDF: per latent dimension one uniform ``u`` picks the first component whose
    cumulative weight of ``softmax(logits / tau)`` exceeds it (as
    :func:`worldmodels.webmodels.sample_from_noise` does), then ``z = mu + sigma sqrt(tau) eps``.
    Each step draws, in this order, ``u`` (K, Z), ``eps`` (K, Z) and the end's coin (K,),
    into buffers made once by :meth:`reset`.
    """

    def __init__(self, mdrnn: MDRNN, temperature: float = 1.15, max_steps: int = CARRACING_MAX_STEPS):
        if mdrnn.reward_head is None:
            raise ValueError("dreaming needs M's reward head: train M with mdrnn.reward_head=True")
        self.mdrnn = mdrnn.eval()
        self.temperature = check_temperature(temperature)
        self.max_steps = int(max_steps)
        self.generator: torch.Generator | None = None
        self.z: Tensor | None = None
        self.state: tuple[Tensor, Tensor] | None = None
        self.alive: Tensor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.t = 0

    @property
    def device(self) -> torch.device:
        return self.mdrnn.mdn.weight.device

    @torch.no_grad()
    def reset(
        self, initial_z: Tensor, generator: torch.Generator | None = None, threads: int = 1
    ) -> tuple[Tensor, Tensor]:
        """Start K dreams at `initial_z` (K, Z); returns ``(z, h)`` with h = 0, on M's device.

        `threads` > 1: each step works on that many slices of the batch at once, in threads
        of this process (see :meth:`step`); :meth:`close` ends them.
        """
        m = self.mdrnn
        if initial_z.ndim != 2 or initial_z.shape[1] != m.z_size:
            raise ValueError(f"initial_z must be (K, {m.z_size}), got {tuple(initial_z.shape)}")
        device, dtype = self.device, m.mdn.weight.dtype
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"the dream's generator is on {generator.device}, M on {device}: "
                f"make it with torch.Generator(device={str(device)!r})"
            )
        n = len(initial_z)
        self.close()
        self.generator = generator
        self._fused = _fuse(m, self.temperature)
        self.z = initial_z.to(device, dtype)
        self.state = m.initial_state(n)
        self.alive = torch.ones(n, dtype=torch.bool, device=device)
        self._inputs = torch.zeros(n, m.z_size + m.action_size + m.hidden_size, device=device, dtype=dtype)
        self._inputs[:, : m.z_size] = self.z
        self._u = torch.empty(n, m.z_size, device=device, dtype=dtype)
        self._eps = torch.empty_like(self._u)
        self._coin = torch.empty(n, device=device, dtype=dtype)
        self._slices = [slice(a, b) for a, b in zip(*_bounds(n, threads if device.type == "cpu" else 1))]
        if len(self._slices) > 1:
            self._pool = ThreadPoolExecutor(len(self._slices), thread_name_prefix="dream")
        self.t = 0
        return self.z, self.state[0]

    def close(self) -> None:
        """End the threads of a dream reset with ``threads > 1`` (nothing else to release)."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.shutdown()

    @torch.no_grad()
    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Advance every dream by one step; returns ``(z_next, reward, done, h)``.

        The step's noise is drawn for the whole batch first, so that dreams computed in
        slices (``reset(..., threads=n)``) get the same numbers as in one piece.
        """
        if self.state is None:
            raise RuntimeError("DreamEnv: call reset first")
        m = self.mdrnn
        self._inputs[:, m.z_size : m.z_size + m.action_size] = actions
        self._u.uniform_(generator=self.generator)
        self._eps.normal_(generator=self.generator)
        coin = self._coin.uniform_(generator=self.generator)
        if self._pool is None:
            z, h, c, heads = self._rows(slice(None))
        else:
            z, h, c, heads = (torch.cat(parts) for parts in zip(*self._pool.map(self._rows, self._slices)))
        self.z, self.state = z, (h, c)
        self._inputs[:, : m.z_size] = z
        self._inputs[:, m.z_size + m.action_size :] = h

        reward = torch.where(self.alive, heads[:, 0], 0.0)
        self.t += 1
        if m.done_head is not None:
            self.alive &= coin >= torch.sigmoid(heads[:, 1])
        if self.t >= self.max_steps:
            self.alive.zero_()
        return z, reward, ~self.alive, h

    def _rows(self, rows: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One step of the dreams `rows`: next ``z``, ``h``, ``c`` and the reward and done logits (n, 2)."""
        fused, hs, zs, k = self._fused, self.mdrnn.hidden_size, self.mdrnn.z_size, self.mdrnn.n_gaussians
        gates = torch.addmm(fused.gates_bias, self._inputs[rows], fused.gates_weight).sigmoid_()
        i, f, o, g = gates.split(hs, dim=1)  # g: sigmoid(2 g), so tanh(g) = 2 g - 1
        c = (f * self.state[1][rows]).addcmul_(i, g, value=2.0).sub_(i)
        h = o * torch.tanh(c)
        heads = torch.addmm(fused.heads_bias, h, fused.heads_weight)
        n, zk = len(h), zs * k
        logits, mu, logsigma = (heads[:, j * zk : (j + 1) * zk].view(n, k, zs) for j in range(3))
        return self._sample(logits, mu, logsigma, self._u[rows], self._eps[rows]), h, c, heads[:, 3 * zk :]

    def _sample(self, logits: Tensor, mu: Tensor, logsigma: Tensor, u: Tensor, eps: Tensor) -> Tensor:
        """The next latents (B, Z) from the mixtures (B, components, Z), logits already divided by tau."""
        top = logits[:, 0].clone()
        for j in range(1, logits.shape[1]):
            torch.maximum(top, logits[:, j], out=top)
        cumulative = (logits - top.unsqueeze(1)).exp_()
        for j in range(1, logits.shape[1]):
            cumulative[:, j] += cumulative[:, j - 1]
        threshold = (u * cumulative[:, -1]).unsqueeze(1)
        index = (cumulative[:, :-1] <= threshold).sum(1, keepdim=True)
        sigma = logsigma.gather(1, index).squeeze(1).exp_()
        return torch.addcmul(mu.gather(1, index).squeeze(1), sigma, eps, value=math.sqrt(self.temperature))


def _bounds(n: int, parts: int) -> tuple[list[int], list[int]]:
    """Starts and ends of `parts` near-equal slices of n rows (fewer, so that each has 64 rows or more)."""
    edges = [round(n * j / max(1, min(parts, n // 64))) for j in range(max(1, min(parts, n // 64)) + 1)]
    return edges[:-1], edges[1:]


def dream_threads(threads: int, batch: int) -> int:
    """Threads for a batch of `batch` dreams on the CPU: `threads`, or with 0 see :data:`THREADED_BATCH`."""
    if threads:
        return threads
    return cpu_count() if batch >= THREADED_BATCH else 1


@torch.no_grad()
def dream_steps(
    env: DreamEnv,
    controller: Controller,
    initial_z: Tensor,
    generator: torch.Generator | None = None,
    check_every: int = DONE_CHECK_EVERY,
    threads: int = 1,
) -> tuple[Tensor, Tensor]:
    """The loop of :func:`dream_rollout`, on M's device: returns (B,) and steps (B,) as tensors there.

    Nothing in it waits for the device but the check, every `check_every` steps, whether
    every dream has ended (the returns depend neither on `check_every` nor on `threads`).
    """
    z, h = env.reset(initial_z, generator, threads)
    acc = torch.float32 if z.device.type == "mps" else torch.float64  # MPS has no float64
    returns = torch.zeros(len(z), dtype=acc, device=z.device)
    steps = torch.zeros(len(z), dtype=torch.int64, device=z.device)
    uses_h = controller.shape.uses_h
    for t in range(1, env.max_steps + 1):
        steps += env.alive
        z, reward, _, h = env.step(controller(z, h if uses_h else None))
        returns += reward
        if t % check_every == 0 and not bool(env.alive.any()):
            break
    return returns, steps


@torch.no_grad()
def dream_rollout(
    env: DreamEnv,
    controller: Controller,
    initial_z: Tensor,
    generator: torch.Generator | None = None,
    *,
    threads: int = 0,
    check_every: int = DONE_CHECK_EVERY,
) -> tuple[np.ndarray, np.ndarray]:
    """Run B dreams to their end, dream b with controller b: returns (returns (B,), steps (B,)).

    The controller must be on M's device; the returns come back from it once, at the end.
    On the CPU, a step of a large batch runs in :func:`dream_threads` slices at once, in
    threads of this process, each torch operation on one thread: the threads meet once a
    step, not once an operation as torch's own intra-op threads do (which on a two-core
    machine busy with other jobs made a generation 4.6 times slower than one thread).
    """
    with one_torch_thread():
        try:
            returns, steps = dream_steps(
                env, controller, initial_z, generator, check_every, dream_threads(threads, len(initial_z))
            )
        finally:
            env.close()
        return returns.double().cpu().numpy(), steps.cpu().numpy()


# --------------------------------------------------------------------------------------
# Initial latents from the run
# --------------------------------------------------------------------------------------
STARTS_FILE = f"controller/{DREAM_STARTS}"
"""Where a run without encoded episodes (a shipped one) keeps its dreams' start latents."""


def initial_latents(run: str | Path | RunDir, frame: int = INITIAL_FRAME) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, logvar)``, each (N, Z) float32: V's posterior at `frame` of every episode of the dataset.

    From the encoded episodes (``run/latents``) when there are any; else from
    :data:`STARTS_FILE` (written by :func:`save_initial_latents`; a shipped run carries
    it); else computed: the first ``frame + 1`` steps of every episode regenerated from
    their seeds (:func:`worldmodels.data.dataset_episodes`) and encoded by the run's V,
    rounded to float16 as the encode stage stores them (about a minute at the ``book``
    scale). Episodes shorter than `frame` contribute their last frame.
    """
    run = as_run_dir(run)
    files = sorted(run.latents.glob("*.npz"))
    if files:
        mus, logvars = [], []
        for f in files:
            with open_npz(f, "latent file", EpisodeError) as d:
                t = min(frame, len(d["mu"]) - 1)
                mus.append(np.asarray(d["mu"][t], np.float32))
                logvars.append(np.asarray(d["logvar"][t], np.float32))
        return np.stack(mus), np.stack(logvars)
    starts = run.controller / DREAM_STARTS
    if starts.exists():
        with open_npz(starts, "start latents file") as d:
            if int(d["frame"]) == frame:
                return d["mu"].astype(np.float32), d["logvar"].astype(np.float32)
    return _encode_initial_frames(run, frame)


@torch.no_grad()
def _encode_initial_frames(run: RunDir, frame: int, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """V's posterior at `frame` of every episode, the episodes regenerated up to that frame."""
    cfg = run.load_config()
    if cfg is None:
        raise FileNotFoundError(f"{run.path}: no latents, no {STARTS_FILE} and no config.json to regenerate them from")
    vae = load_vae(run).double()  # float64, then float16: the same bits on any CPU
    mus, logvars = [], []
    for k in range(0, cfg.data.episodes, chunk):
        episodes = dataset_episodes(cfg, run, range(k, min(k + chunk, cfg.data.episodes)), steps=frame + 1)
        frames = np.stack([ep.obs[frame] if frame < len(ep) else ep.final_obs for ep in episodes])
        mu, logvar = vae.encode(frames_to_tensor(frames).double())
        mus.append(mu.half().float().numpy())
        logvars.append(logvar.half().float().numpy())
    return np.concatenate(mus), np.concatenate(logvars)


def save_initial_latents(run: str | Path | RunDir, path: str | Path | None = None, frame: int = INITIAL_FRAME) -> Path:
    """Write :func:`initial_latents` of `run` (float16, exactly as stored by the encode stage) to `path`.

    `path` defaults to the run's :data:`STARTS_FILE`; :func:`worldmodels.pretrained.export`
    writes it into a shipped run, so that dreams start without the dataset.
    """
    run = as_run_dir(run)
    mu, logvar = initial_latents(run, frame)
    path = Path(path) if path is not None else run.controller / DREAM_STARTS
    save_npz(path, mu=mu.astype(np.float16), logvar=logvar.astype(np.float16), frame=np.int64(frame))
    return path


def initial_z_for_seeds(mu: np.ndarray, logvar: np.ndarray, seeds: np.ndarray) -> Tensor:
    """One start latent per seed: episode ``i ~ U{0..N-1}``, ``z = mu_i + exp(logvar_i / 2) * eps``,
    both drawn from ``default_rng(seed)``: a seed always gives the same start."""
    out = np.empty((len(seeds), mu.shape[1]), np.float32)
    for j, s in enumerate(np.asarray(seeds).reshape(-1)):
        rng = np.random.default_rng(int(s))
        i = rng.integers(len(mu))
        out[j] = mu[i] + np.exp(0.5 * logvar[i]) * rng.standard_normal(mu.shape[1])
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------
# Evolution in the dream
# --------------------------------------------------------------------------------------
@dataclass
class DreamWorker:
    """What a dream task needs (built once): M (on the dreams' device), the start latents, the controller's shape."""

    mdrnn: MDRNN
    mu: np.ndarray
    logvar: np.ndarray
    shape: ControllerShape
    temperature: float
    threads: int = 0
    """Torch threads (0: see :func:`dream_threads`)."""


def dream_task(worker: DreamWorker, task: Task) -> np.ndarray:
    """The task function of the dream: all the task's episodes as one batch of dreams; their returns (n,)."""
    env = DreamEnv(worker.mdrnn, worker.temperature, task.max_steps)
    controller = Controller.from_shape(worker.shape, task.params, device=env.device)
    z0 = initial_z_for_seeds(worker.mu, worker.logvar, task.seeds)
    # Validation dreams are the same every time (the generation is left out of their seed),
    # so that the best mean is chosen on one fixed set of dreams, not on lucky noise.
    generation = 0 if task.kind == "validate" else task.generation
    key = np.random.SeedSequence([generation, *map(int, np.unique(task.seeds))]).generate_state(1)[0]
    generator = torch.Generator(env.device).manual_seed(int(key))
    returns, _ = dream_rollout(env, controller, z0, generator, threads=worker.threads)
    return returns


def dream_prefix(tau: float) -> str:
    """File prefix of a dream run at temperature tau: ``dream_tau1.15_``."""
    return f"dream_tau{tau:g}_"


def dream_controller_path(run: str | Path | RunDir, tau: float | None = None) -> Path:
    """The file of `run`'s dream-trained controller at temperature `tau` (default: the run's
    ``dream.temperature``); a missing one raises RunDirError naming it and the command that makes it."""
    run = as_run_dir(run)
    if tau is None:
        cfg = run.load_config()
        tau = cfg.dream.temperature if cfg is not None else DreamConfig().temperature
    tau = check_temperature(tau)
    path = run.controller / f"{dream_prefix(tau)}{BEST_WEIGHTS['controller']}"
    if not path.exists():
        raise RunDirError(
            f"{path}: no dream-trained controller at tau {tau:g}; make it with "
            f"`python -m worldmodels dream --run-dir {run.path} --dream.temperature {tau:g}`"
        )
    return path


@dataclass
class DreamResult:
    params: np.ndarray
    """The best controller in the dream (validated on fixed dream seeds)."""
    temperature: float
    dream_return: float
    """Its mean return on the dream's validation seeds."""
    real: dict[str, Any] | None
    """Its evaluation in the real environment (:class:`worldmodels.evaluation.EvalResult` as a dict)."""


def dream_cma(cfg: Config) -> CMAConfig:
    """``cfg.cma`` as the dream uses it: ``cfg.dream``'s population, episodes per candidate,
    generations (when set) and episode length, and no early termination (a dream has no tiles).
    The real evolution keeps ``cfg.cma``'s population (the ``book`` scale: 16 x 4), the dream
    affords the paper's 64 x 16."""
    d = cfg.dream
    return dataclasses.replace(
        cfg.cma, population=d.population, episodes_per_candidate=d.episodes_per_candidate,
        generations=d.generations or cfg.cma.generations, max_steps=d.max_steps, early_stop_steps=0,
    )


def _dream_record(run: RunDir, tau: float) -> dict[str, Any] | None:
    """The dream record's entry for `tau` (``controller/dream.json``), or None."""
    path = run.controller / DREAM_SUMMARY
    return (read_json(path) if path.exists() else {}).get(f"{tau:g}")


def _update_dream_record(run: RunDir, tau: float, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the dream record's entry for `tau`, read just before writing: real
    evaluations are long, and other processes (other temperatures, a correlation) write to the
    same record meanwhile. Returns the entry as written."""
    path = run.controller / DREAM_SUMMARY
    summary = read_json(path) if path.exists() else {}
    entry = summary[f"{tau:g}"] = {**summary.get(f"{tau:g}", {}), **fields}
    write_json(path, summary)
    return entry


def train_controller_in_dream(
    cfg: Config,
    run: str | Path | RunDir,
    *,
    quiet: bool = False,
    max_generations: int | None = None,
    evaluate_real: bool = True,
    real_max_steps: int | None = None,
) -> DreamResult:
    """Evolve C with CMA-ES inside M's dream, then score it in the real CarRacing-v3.

    Pseudocode::

        tau = cfg.dream.temperature
        each generation: theta_1..theta_K ~ CMA-ES
            B = K x E dreams in one batch, start latents from real episodes (frame 50)
            repeat up to cfg.dream.max_steps: a = C_k(z, h); z ~ M(z, a, h; tau); R += M's reward
            F_k = mean_e R_ke - weight_decay * mean(theta_k^2)
        best mean (on fixed dream validation seeds) -> real CarRacing on cfg.eval's tracks

    Uses cfg.dream for the population, the episodes per candidate, the generations and the
    length of a dream, and cfg.cma for the rest of the search (sigma0, eval_every,
    eval_episodes, selection, seed): see :func:`dream_cma`. The dreams run on
    ``resolve_device(cfg.device)``. Files in ``run/controller/``: ``dream_tau{tau}_es.pkl``,
    ``_history.csv``, ``_best.safetensors``, ``_last.safetensors``, ``_done.json`` and
    ``dream.json`` (per tau: dream return, real mean and std). Runs at several
    temperatures may share a run directory (the temperature is not checked against the
    recorded config). Once the run is finished (:func:`worldmodels.evolution.is_finished`:
    ``_done.json``, ``_best.safetensors`` and, with a final selection, ``_selection.json``),
    it only loads (a shipped run has no checkpoint), and evaluates in the real environment
    if that is still missing.
    """
    tau = check_temperature(cfg.dream.temperature)
    run = as_run_dir(run)
    recorded = run.load_config()
    run.bind(cfg if recorded is None else cfg.replace(**{"dream.temperature": recorded.dream.temperature}))
    out = run.controller
    prefix = dream_prefix(tau)
    cma_cfg = dream_cma(cfg)
    if is_finished(out, cma_cfg, prefix):  # finished, perhaps shipped without its checkpoint: load
        done = read_json(out / f"{prefix}{DONE_FILE}")
        params = load_controller(out / f"{prefix}{BEST_WEIGHTS['controller']}").params
        score, generation = done["best_score"], done["generations"]
    else:
        result = _evolve_in_dream(cfg, run, cma_cfg, tau, max_generations=max_generations, quiet=quiet)
        params, score, generation = result.best_params, result.best_score, result.generation
        if not result.finished:
            return DreamResult(params, tau, score, None)
    real_max_steps = cfg.eval.max_steps if real_max_steps is None else real_max_steps
    update: dict[str, Any] = dict(temperature=tau, dream_return=score, generations=generation)
    if evaluate_real and "real_mean" not in (_dream_record(run, tau) or {}):
        update.update(_evaluate_real(cfg, run, params, real_max_steps))
    entry = _update_dream_record(run, tau, **update)
    real = {k: entry[k] for k in ("real_mean", "real_std", "real_episodes") if k in entry} or None
    return DreamResult(params, tau, score, real)


def _evolve_in_dream(cfg: Config, run: RunDir, cma_cfg: CMAConfig, tau: float, *, max_generations: int | None,
                     quiet: bool) -> EvolutionResult:
    """CMA-ES in M's dream at temperature `tau`, one batch of dreams per generation, checkpointed in run/controller."""
    shape = ControllerShape.from_config(cfg)
    mu, logvar = initial_latents(run)
    device = resolve_device(cfg.device)
    worker = DreamWorker(load_mdrnn(run, device).eval(), mu, logvar, shape, tau, cfg.dream.threads)
    population = cma_cfg.population * cma_cfg.episodes_per_candidate
    key = f"{tau:g}"

    def save(path: Path, params: np.ndarray, metadata: dict[str, str]) -> None:
        save_controller(path, params, shape, {**metadata, "temperature": key})

    return evolve(
        dream_task,
        shape.n_params,
        cma_cfg,
        InlineExecutor(init=lambda: worker),
        checkpoint_dir=run.controller,
        task_size=max(population, cma_cfg.eval_episodes),  # one batch of dreams per generation
        max_generations=max_generations,
        save_params=save,
        prefix=dream_prefix(tau),
        quiet=quiet,
        desc=f"dream tau={key}",
    )


def _evaluate_real(cfg: Config, run: RunDir, params: np.ndarray, max_steps: int) -> dict[str, Any]:
    """The dream-trained controller on the real evaluation tracks (cfg.eval): mean, std, episodes."""
    from worldmodels.evaluation import evaluate
    from worldmodels.rollout import Agent

    agent = Agent.from_run(run, cfg)
    seeds = [cfg.eval.seed + i for i in range(cfg.eval.episodes)]
    ev = evaluate(
        agent, params, seeds, cfg.env, envs_per_batch=cfg.cma.envs_per_worker, max_steps=max_steps,
        workers=cfg.cma.workers,
    )
    return dict(real_mean=ev.mean, real_std=ev.std, real_episodes=len(seeds), real_max_steps=max_steps)


# --------------------------------------------------------------------------------------
# Choosing the temperature; does the dream's return predict the real one?
# --------------------------------------------------------------------------------------
TEMPERATURES = (0.5, 1.0, 1.15, 1.3, 1.5)
"""The temperatures of :func:`temperature_table` by default (the paper's Doom table: 0.1 to 1.3)."""


def real_validation_seeds(cfg: Config, episodes: int | None = None) -> np.ndarray:
    """Real tracks on which dream controllers are compared: CMA-ES's validation tracks, then its
    selection tracks (``cma.eval_episodes + cma.select_episodes`` of them by default), never the
    evaluation tracks (a `episodes` that would reach them raises ValueError)."""
    n = cfg.cma.eval_episodes + cfg.cma.select_episodes if episodes is None else int(episodes)
    if n < 1:
        raise ValueError(f"real validation episodes must be >= 1, got {n}")
    seeds = cfg.cma.seed + CMA_VALIDATION_OFFSET + np.arange(n, dtype=np.int64)
    if seeds[0] < cfg.eval.seed + cfg.eval.episodes and cfg.eval.seed <= seeds[-1]:
        raise ValueError(
            f"real validation episodes: {n} tracks from seed {seeds[0]} would reach the evaluation tracks "
            f"[{cfg.eval.seed}, {cfg.eval.seed + cfg.eval.episodes}); ask for fewer"
        )
    return seeds


def real_returns(
    cfg: Config, run: str | Path | RunDir, params: np.ndarray, seeds: np.ndarray, max_steps: int,
    workers: int | None = None,
) -> np.ndarray:
    """Returns (K, E) of K controllers (rows of `params`) on the real tracks `seeds`, full
    episodes driven exactly (float64), as the evaluation drives; `workers` default ``cfg.cma.workers``."""
    from worldmodels.parallel import make_executor
    from worldmodels.rollout import Agent, rollout_task, rollout_worker
    from worldmodels.tasks import make_tasks, run_tasks

    params = np.atleast_2d(np.asarray(params, np.float64))
    agent = Agent.from_run(as_run_dir(run), cfg)
    tasks = make_tasks("validate", params, seeds, cfg.cma.envs_per_worker, max_steps, float64=True)
    workers = cfg.cma.workers if workers is None else workers
    if workers == 1:
        executor = InlineExecutor(init=lambda: (agent, cfg.env))
    else:
        executor = make_executor(workers, init=rollout_worker, init_args=agent.init_args(cfg))
    try:
        return run_tasks(executor, rollout_task, tasks, cfg.cma.task_timeout).reshape(len(params), len(seeds))
    finally:
        executor.close()


def dream_returns(
    cfg: Config, run: str | Path | RunDir, params: np.ndarray, seeds: np.ndarray, tau: float | None = None,
    max_steps: int | None = None,
) -> np.ndarray:
    """Returns (K, E) of K controllers in M's dream at `tau` (default ``cfg.dream.temperature``),
    one dream per start seed (:func:`initial_z_for_seeds`), all as one batch, drawn as the
    dream's validation draws them (the same dreams whatever the generation)."""
    params = np.atleast_2d(np.asarray(params, np.float64))
    run = as_run_dir(run)
    mu, logvar = initial_latents(run)
    mdrnn = load_mdrnn(run, resolve_device(cfg.device)).eval()
    tau = check_temperature(cfg.dream.temperature if tau is None else tau)
    worker = DreamWorker(mdrnn, mu, logvar, ControllerShape.from_config(cfg), tau, cfg.dream.threads)
    steps = cfg.dream.max_steps if max_steps is None else max_steps
    (task,) = make_tasks("validate", params, seeds, len(params) * len(seeds), steps)
    return dream_task(worker, task).reshape(len(params), len(seeds))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `x`, ties given their average rank (as Spearman's correlation needs)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def correlations(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Pearson's and Spearman's correlation of two vectors (NaN where one of them is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"correlations need two vectors of the same length >= 2, got {a.shape} and {b.shape}")

    def pearson(x: np.ndarray, y: np.ndarray) -> float:
        x, y = x - x.mean(), y - y.mean()
        denominator = math.sqrt(float(x @ x) * float(y @ y))
        return float(x @ y) / denominator if denominator > 0 else math.nan

    return pearson(a, b), pearson(_ranks(a), _ranks(b))


def dream_real_correlation(
    cfg: Config,
    run: str | Path | RunDir,
    params: np.ndarray,
    seeds: np.ndarray | None = None,
    *,
    tau: float | None = None,
    real_max_steps: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Does a candidate's dream return predict its real return? K controllers (rows of `params`)
    scored in the dream (:func:`dream_returns`, the seeds as start seeds) and in the real
    CarRacing on the same seeds as tracks (:func:`real_returns`; default
    :func:`real_validation_seeds`), each candidate's mean over the seeds; returns both vectors
    (``dream``, ``real``, (K,)), the per-episode ``dream_episodes`` and ``real_episodes``
    (K, E), and ``pearson`` and ``spearman``, the correlations over the candidates."""
    params = np.atleast_2d(np.asarray(params, np.float64))
    seeds = real_validation_seeds(cfg) if seeds is None else np.asarray(seeds, np.int64).reshape(-1)
    tau = check_temperature(cfg.dream.temperature if tau is None else tau)
    dream = dream_returns(cfg, run, params, seeds, tau)
    real = real_returns(cfg, run, params, seeds, cfg.eval.max_steps if real_max_steps is None else real_max_steps,
                        workers)
    pearson, spearman = correlations(dream.mean(1), real.mean(1))
    return {
        "temperature": tau, "seeds": seeds.tolist(), "dream": dream.mean(1), "real": real.mean(1),
        "dream_episodes": dream, "real_episodes": real, "pearson": pearson, "spearman": spearman,
    }


def recorded_correlation(
    cfg: Config,
    run: str | Path | RunDir,
    *,
    candidates: int = 16,
    real_episodes: int | None = None,
    tau: float | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """:func:`dream_real_correlation` of `candidates` controllers drawn around the finished dream
    run at `tau` (:func:`candidates_from_checkpoint`, seed 0) on the first `real_episodes` real
    validation tracks (:func:`real_validation_seeds`), recorded in ``controller/dream.json`` under
    the temperature's ``correlation``: a second call with the same settings (temperature,
    candidates, seeds, ``eval.max_steps``, ``dream.max_steps``), or a shipped run (which has no
    CMA-ES checkpoint to draw from), only reads it.

    Returns those settings, ``drawn_from`` ('checkpoint': the CMA-ES state; 'best': the best
    controller plus isotropic noise), the lists ``dream`` and ``real`` (each candidate's mean
    return over the seeds), ``pearson`` and ``spearman``.
    """
    run = as_run_dir(run)
    tau = check_temperature(cfg.dream.temperature if tau is None else tau)
    if candidates < 2:
        raise ValueError(f"correlation candidates must be >= 2, got {candidates}")
    seeds = real_validation_seeds(cfg, real_episodes)
    settings = {
        "temperature": tau, "candidates": int(candidates), "seeds": seeds.tolist(),
        "max_steps": cfg.eval.max_steps, "dream_max_steps": cfg.dream.max_steps,
    }
    entry = _dream_record(run, tau)
    if entry is None:
        raise RunDirError(f"{run.controller / DREAM_SUMMARY}: no finished dream run at tau {tau:g} to draw candidates around")
    recorded = entry.get("correlation")
    if recorded is not None and {k: recorded.get(k) for k in settings} == settings:
        return recorded
    params, drawn_from = candidates_from_checkpoint(run, tau, candidates)
    out = dream_real_correlation(cfg, run, params, seeds, tau=tau, workers=workers)
    recorded = {**settings, "drawn_from": drawn_from, "dream": out["dream"].tolist(), "real": out["real"].tolist(),
                "pearson": out["pearson"], "spearman": out["spearman"]}
    _update_dream_record(run, tau, correlation=recorded)
    return recorded


def candidates_from_checkpoint(
    run: str | Path | RunDir, tau: float, k: int, seed: int = 0
) -> tuple[np.ndarray, str]:
    """`k` controllers (k, P) around the dream run at `tau`, as CMA-ES would sample them, and
    where they were drawn from: from its saved CMA-ES state (``dream_tau{tau}_es.pkl``, left
    unchanged) when there is one ('checkpoint'); else (a shipped run has none) the best
    controller plus isotropic noise of the last recorded step size, drawn from `seed` ('best')."""
    from worldmodels.evolution import load_checkpoint, read_history
    from worldmodels.runs import HISTORY_FILE

    run, prefix = as_run_dir(run), dream_prefix(check_temperature(tau))
    checkpoint = run.controller / f"{prefix}{ES_CHECKPOINT}"
    if checkpoint.exists():
        es = load_checkpoint(checkpoint).es
        es.opts["randn"].rng = np.random.RandomState(seed)
        return np.asarray(es.ask(k), np.float64), "checkpoint"
    best = load_controller(dream_controller_path(run, tau)).params
    history = read_history(run.controller / f"{prefix}{HISTORY_FILE}")
    sigma = history[-1]["sigma"]
    return best + sigma * np.random.default_rng(seed).standard_normal((k, len(best))), "best"


def temperature_table(
    cfg: Config,
    run: str | Path | RunDir,
    taus: tuple[float, ...] = TEMPERATURES,
    *,
    real_episodes: int | None = None,
    real_max_steps: int | None = None,
    max_generations: int | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """The paper's temperature table: for each tau, the controller trained in the dream at tau
    (:func:`train_controller_in_dream`: trained, continued or loaded, files ``dream_tau{tau}_*``),
    its dream return and its real return on validation tracks (:func:`real_validation_seeds`, full
    episodes of `real_max_steps`, default ``eval.max_steps``). The evaluation tracks are never
    used here: choose tau by the real validation return, then score that controller on them
    (``python -m worldmodels evaluate --controller dream --tau TAU``).

    One row (dict) per tau: ``temperature``, ``finished``, ``generations``, ``dream_return`` and,
    once finished, ``real_mean``, ``real_std``, ``real_episodes`` (recorded in ``dream.json`` under
    ``validation``, so that a second call only reads them).
    """
    run = as_run_dir(run)
    seeds = real_validation_seeds(cfg, real_episodes)
    max_steps = cfg.eval.max_steps if real_max_steps is None else real_max_steps
    record = {"first_seed": int(seeds[0]), "episodes": len(seeds), "max_steps": max_steps}
    rows = []
    for tau in taus:
        tau = check_temperature(tau)
        res = train_controller_in_dream(
            cfg.replace(**{"dream.temperature": tau}), run, quiet=quiet, max_generations=max_generations,
            evaluate_real=False,
        )
        entry = _dream_record(run, tau)
        row: dict[str, Any] = {"temperature": tau, "finished": entry is not None, "dream_return": res.dream_return}
        if entry is not None:
            validation = entry.get("validation")
            if validation is None or {k: validation.get(k) for k in record} != record:
                r = real_returns(cfg, run, res.params[None], seeds, max_steps, workers)[0]
                validation = {**record, "mean": float(r.mean()), "std": float(r.std())}
                _update_dream_record(run, tau, validation=validation)
            row.update(generations=entry["generations"], real_mean=validation["mean"], real_std=validation["std"],
                       real_episodes=validation["episodes"])
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`temperature_table` as a Markdown table; the best real return in bold."""
    finished = [r for r in rows if "real_mean" in r]
    best = max(finished, key=lambda r: r["real_mean"]) if finished else None
    episodes = finished[0]["real_episodes"] if finished else 0
    lines = [
        f"| tau | generations | dream return | real return ({episodes} validation tracks) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "real_mean" not in r:
            lines.append(f"| {r['temperature']:g} | not finished | {r['dream_return']:.1f} | |")
            continue
        real = f"{r['real_mean']:.1f} ± {r['real_std']:.1f}"
        lines.append(f"| {r['temperature']:g} | {r['generations']} | {r['dream_return']:.1f} | "
                     f"{f'**{real}**' if r is best else real} |")
    return "\n".join(lines)
