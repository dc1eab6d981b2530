"""The optimiser and the schedules of a run: learning rate and gate dropout
(the gate losses' weights over training are part of the objective,
losses.py)."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import ml_collections
import optax

from gaternet_jax.errors import ConfigError


def create_learning_rate_fn(
    opt_cfg: ml_collections.ConfigDict,
    steps_per_epoch: int,
    num_train_steps: int,
) -> optax.Schedule:
  """Step ('step': boundaries in epochs), cosine, exponential, poly or
  constant schedule, after an optional warm-up of `warmup_epochs`.

  The warm-up rises linearly to the base rate, or holds `warmup_lr` when
  that is set (He et al.'s ResNet-164 trains at 0.01 for its first ~400
  iterations). Step boundaries and exponential decay count epochs from the
  start of training; the cosine schedule starts after the warm-up and ends
  at 0 on the last step.
  """
  base = opt_cfg.learning_rate
  warmup = int(round(opt_cfg.warmup_epochs * steps_per_epoch))
  warmup_lr = opt_cfg.warmup_lr or 0.0
  if warmup_lr < 0:
    raise ConfigError(f'optimizer.warmup_lr must be >= 0; got {warmup_lr}.')
  if opt_cfg.schedule == 'step':
    boundaries = {
        int(round(e * steps_per_epoch)): opt_cfg.lr_decay
        for e in opt_cfg.lr_boundaries
    }
    main = optax.piecewise_constant_schedule(base, boundaries)
  elif opt_cfg.schedule == 'cosine':
    cosine = optax.cosine_decay_schedule(base, max(num_train_steps - warmup, 1))
    main = lambda s: cosine(jnp.maximum(s - warmup, 0))
  elif opt_cfg.schedule == 'exponential':
    # Inception-v4: decay by `lr_decay` every `decay_epochs` epochs.
    main = optax.exponential_decay(
        base,
        max(int(round(opt_cfg.decay_epochs * steps_per_epoch)), 1),
        opt_cfg.lr_decay,
        staircase=True,
    )
  elif opt_cfg.schedule == 'constant':
    main = optax.constant_schedule(base)
  elif opt_cfg.schedule == 'poly':
    # DeepLab's: base * (1 - t / T) ** poly_power after the warm-up.
    poly = optax.polynomial_schedule(
        base, 0.0, opt_cfg.poly_power, max(num_train_steps - warmup, 1)
    )
    main = lambda s: poly(jnp.maximum(s - warmup, 0))
  else:
    raise ConfigError(
        f'optimizer.schedule must be step, cosine, exponential, poly '
        f'or constant; got {opt_cfg.schedule!r}.'
    )
  if warmup <= 0:
    return main

  def schedule(s):
    ramp = (
        jnp.full_like(s, warmup_lr, jnp.float32)
        if warmup_lr
        else base * (s + 1) / warmup
    )
    return jnp.where(s < warmup, ramp, main(s))

  return schedule


def create_optimizer(
    opt_cfg: ml_collections.ConfigDict, lr_fn: optax.Schedule
) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, or RMSProp as Inception-v4 trains."""
  name = opt_cfg.name
  if name == 'sgd':
    return optax.sgd(
        lr_fn, momentum=opt_cfg.momentum or None, nesterov=opt_cfg.nesterov
    )
  if name == 'rmsprop':
    return optax.rmsprop(
        lr_fn,
        decay=opt_cfg.rmsprop_decay,
        eps=opt_cfg.rmsprop_eps,
        momentum=opt_cfg.momentum,
    )
  raise ConfigError(f'optimizer.name must be sgd or rmsprop; got {name!r}.')


def create_gate_dropout_fn(
    config: ml_collections.ConfigDict, num_train_steps: int
) -> Callable:
  """Scheduled dropout of the gates: 0 at the start, rising linearly to
  `config.model.gate_dropout` at the end of training (Appendix B)."""
  final = float(config.model.gate_dropout)
  if not 0.0 <= final < 1.0:
    raise ConfigError(f'model.gate_dropout must be in [0, 1); got {final}.')
  if final == 0.0:
    return lambda step: 0.0
  return lambda step: final * jnp.minimum(
      step.astype(jnp.float32) / max(num_train_steps, 1), 1.0
  )
