"""The three presets: ``tiny`` (CI), ``book`` (a 2-core laptop) and ``paper`` (the paper's
hyperparameters); where a ``book`` or ``tiny`` value departs from the paper, it says why."""

from __future__ import annotations

from typing import Any

from worldmodels.config.pipeline import Config
from worldmodels.config.sections import (
    SCALES,
    CMAConfig,
    ConfigError,
    DataConfig,
    DreamConfig,
    EvalConfig,
    IterateConfig,
    MDRNNConfig,
    VAEConfig,
)


def paper() -> Config:
    """The paper's CarRacing setting (Ha & Schmidhuber 2018 and the authors' code).

    No iterations (``iterate.iterations = 0``): the paper states its iterative training
    procedure for tasks that random play cannot explore, and its CarRacing agent (906 +- 21)
    came from one pass over 10,000 random episodes. ``--iterate.iterations N`` adds them.
    """
    return Config(scale="paper")


def book() -> Config:
    """A reader's laptop: two CPU cores, about three hours for the whole pipeline.

    Budget measured on a 2-core Xeon (benchmarks/README.md): collection ~740 steps/s,
    V ~500 frames/s, M ~47,000 sequence steps/s, agent rollouts ~600 steps/s. The
    controller gets most of the time: it is where the score comes from. Departures from
    the paper, each with its reason:
    """
    return Config(
        scale="book",
        # 300 episodes (~7 min) instead of 10,000 (days on two cores): V and M see the
        # track's few textures and the car's states well before that.
        data=DataConfig(episodes=300, episode_steps=1000),
        # 300 random frames of each episode per epoch, 4 epochs (~12 min); a higher
        # learning rate than the authors' 1e-4 because we take ~30x fewer steps.
        vae=VAEConfig(epochs=4, frames_per_episode=300, learning_rate=5e-4),
        # 200-step windows in batches of 32 (~6 s an epoch), many epochs: M is cheap.
        mdrnn=MDRNNConfig(seq_len=200, batch_size=32, epochs=40),
        # 16 candidates x 4 episodes (the paper: 64 x 16), ~35 s a generation with the
        # fast renderer. A first run with 2 episodes per candidate peaked at generation 60
        # (validation 810, 768 on the evaluation tracks) and then drifted: with 2 tracks a
        # candidate's rank is mostly luck (one spin-out halves its fitness), sigma grew and
        # the mean got worse. 4 tracks make the ranking reward robust driving.
        # Rollouts that gain no tile for 100 steps end early (their return charged as if
        # idling to the end); the mean is checked every 10 generations on 16 fixed
        # validation tracks (the paper: 1,024), cheap but noisy (+-50), so the final
        # choice re-scores the 4 best-validated means on 48 more validation tracks
        # (~2 min) and keeps the best. 160 generations: ~2.4 h on a 2-core EPYC (54 s a
        # generation; ~97 s on a slower 2-core Xeon), so the pipeline takes nearer 3 h than
        # 2, but the score is what the budget is for: the run stopped at 120 scored
        # 785 +- 187 on the 100 evaluation tracks, its own continuation to 160 scored
        # 843 +- 89 (validation means 782, 797, 797, 801 at generations 129-159); the extra
        # 40 generations buy the 800 the book aims at and cut the spin-outs' tail.
        cma=CMAConfig(
            population=16,
            episodes_per_candidate=4,
            generations=160,
            eval_every=10,
            eval_episodes=16,
            select_top=4,
            select_episodes=48,
            early_stop_steps=100,
        ),
        # In the dream, the paper's population (64 x 16, the DreamConfig defaults): a
        # generation is one batch of 1,024 dreams, cheap enough on 2 cores
        # (benchmarks/README.md); 120 generations show the learning curve flatten.
        dream=DreamConfig(generations=120),
        eval=EvalConfig(episodes=100),
        # Iterations of 200 episodes of the current controller's driving (parameter noise
        # 0-0.2): iteration 1 drives the controller trained on the real track, later ones
        # the previous iteration's dream controller, so that M sees the failures the dream
        # taught (a dream controller on M trained only on random and agent driving steered
        # hard left and right at nearly full gas: M predicted ~0.2 reward a step, the real
        # car spun out). M is fine-tuned for 10 epochs on all the data; over-predicted
        # rewards weigh 5x (with plain MSE a dream controller made ~1 reward a step in the
        # dream and 16 on 8 real validation tracks; an experiment, not in the book).
        # C is evolved again in the dream for 40 generations of 64 x 16 dreams. Four
        # iterations: the dream controllers of iterations 1-3 scored -37, 207 and 691 on 16
        # validation tracks (iterations/NN/record.json), still rising after the third.
        iterate=IterateConfig(
            iterations=4, episodes=200, mdrnn_epochs=10, reward_overprediction=5.0, controller="dream",
            controller_generations=40,
        ),
    )


def tiny() -> Config:
    """CI and tests: every stage in seconds; the numbers it produces mean nothing."""
    return Config(
        scale="tiny",
        data=DataConfig(episodes=4, episode_steps=60, envs_per_worker=2, workers=2),
        vae=VAEConfig(z_size=32, batch_size=16, epochs=1, frames_per_episode=20, shuffle_episodes=4),
        mdrnn=MDRNNConfig(hidden_size=32, seq_len=16, batch_size=4, epochs=1),
        cma=CMAConfig(
            population=4,
            episodes_per_candidate=1,
            generations=2,
            eval_every=1,
            eval_episodes=2,
            max_steps=30,
            workers=2,
            envs_per_worker=2,
            task_timeout=600.0,
        ),
        dream=DreamConfig(max_steps=30, population=4, episodes_per_candidate=1),
        eval=EvalConfig(episodes=2, max_steps=30),
        iterate=IterateConfig(iterations=1, episodes=4, mdrnn_epochs=1, controller_generations=1, score_episodes=2),
    )


_PRESETS = {"tiny": tiny, "book": book, "paper": paper}


def preset(name: str, **overrides: Any) -> Config:
    """The preset `name` ('tiny', 'book' or 'paper'), with optional overrides (see Config.replace)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(SCALES)}")
    cfg = _PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
