"""Up-front validation of an ml_collections config, run by ``main.py`` before any work starts.

:func:`validate_config` checks every field that would otherwise fail late (after data loading, model
initialisation or hours of training) and raises one ``ValueError`` listing every problem, one line each,
each naming the field, its bad value and what is allowed.

The checks are three tables:

* ``_CHOICES``: fields whose value must come from a known set (SDE, model, predictor, corrector, sampler,
  ODE solver, dataset). The sets of models, predictors and correctors are read from their registries, so
  a newly registered one is accepted without editing this file.
* ``_MULTIPLES``: integer fields that must be a multiple of another quantity (image size of the U-Net's
  down-sampling factor, batch sizes of the device count, frequencies of ``training.n_jitted_steps``).
* ``_RANGES``: numbers that must lie in a range (widths, probabilities, noise scales, the learning rate and
  the run length), which would otherwise fail deep inside JAX or, worse, train without failing.

:func:`config_changes` compares a config with the one a training workdir recorded: the fields of
:data:`SAFE_TO_CHANGE` may differ between runs of one workdir, any other difference means other checkpoints
(``run_lib.check_workdir_config`` refuses it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax

_MISSING = object()

MODES = ('train', 'eval')
"""Modes of ``main.py --mode``."""

DATASETS = ('CIFAR10', 'SVHN', 'CELEBA', 'LSUN', 'FFHQ', 'CelebAHQ', 'DIGITS', 'FASHION_MNIST', 'GMM',
            'ImageNet')
"""Values accepted for ``config.data.dataset`` (exact spelling, as ``score_sde.datasets`` compares them)."""


def _lookup(config, path: str) -> Any:
    """The value at dotted ``path`` (e.g. ``'training.sde'``), or ``_MISSING`` if a part is absent."""
    node = config
    for part in path.split('.'):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


def _sdes() -> Sequence[str]:
    return ('vpsde', 'subvpsde', 'vesde')


def _models() -> Sequence[str]:
    from models import utils as model_utils  # lazy: imports every architecture

    return model_utils.registered_models()


def _predictors() -> Sequence[str]:
    import sampling  # lazy: pulls in models and JAX code

    return sampling.registered_predictors()


def _sampling_methods() -> Sequence[str]:
    import sampling

    return sampling.sampling_methods()


def _correctors() -> Sequence[str]:
    import sampling

    return sampling.registered_correctors()


def _dequantizer_architectures() -> Sequence[str]:
    from models.flowpp import dequantizer  # lazy: JAX / flax code

    return tuple(dequantizer.ARCHITECTURES)


@dataclasses.dataclass(frozen=True)
class _Choice:
    """``field`` must be one of ``allowed()``; ``fold`` maps the value before the comparison."""

    field: str
    allowed: Callable[[], Sequence[str]]
    fold: Callable[[str], str] = str
    required: bool = True


_CHOICES: tuple[_Choice, ...] = (
    # sde_lib.get_sde compares case-insensitively; so does the sampler choice in sampling.get_sampling_fn.
    _Choice('training.sde', _sdes, fold=str.lower),
    _Choice('model.name', _models),
    _Choice('sampling.method', _sampling_methods, fold=str.lower),
    _Choice('sampling.predictor', _predictors),
    _Choice('sampling.corrector', _correctors),
    _Choice('sampling.ode_solver', lambda: ('jax', 'scipy'), required=False),
    _Choice('model.dtype', lambda: ('float32', 'bfloat16'), required=False),  # models.utils.COMPUTE_DTYPES
    _Choice('training.fuse_steps_with', lambda: ('auto', 'unroll', 'scan'), required=False),  # train_steps.FUSIONS
    _Choice('data.dataset', lambda: DATASETS),
    _Choice('deq.arch', _dequantizer_architectures, required=False),  # the Flow++ dequantiser (issue 15)
)


@dataclasses.dataclass(frozen=True)
class _Multiple:
    """Integer ``field`` must be a multiple of ``divisor(config)``.

    ``divisor`` returns ``None`` when the rule does not apply to this config, and ``explain`` says
    where the divisor comes from. ``modes`` lists the ``--mode`` values the rule matters for.
    """

    field: str
    divisor: Callable[[Any], int | None]
    explain: str
    modes: tuple[str, ...] = MODES


def _downsampling_factor(config) -> int | None:
    ch_mult = _lookup(config, 'model.ch_mult')
    if ch_mult is _MISSING or ch_mult is None:
        return None  # NCSN/NCSNv2 have no ch_mult; their resolution rule is their own
    return 2 ** (len(ch_mult) - 1)


def _jitted_steps(config) -> int | None:
    n = _lookup(config, 'training.n_jitted_steps')
    return None if n is _MISSING else n


def _device_count(config) -> int:
    del config
    return jax.device_count()


_MULTIPLES: tuple[_Multiple, ...] = (
    _Multiple('data.image_size', _downsampling_factor,
              '2**(len(model.ch_mult) - 1), the U-Net halves the image len(model.ch_mult) - 1 times'),
    _Multiple('training.batch_size', _device_count, 'jax.device_count(), the batch is split over the devices'),
    _Multiple('eval.batch_size', _device_count, 'jax.device_count(), the batch is split over the devices',
              modes=('eval',)),
    *(_Multiple(f'training.{freq}', _jitted_steps,
                'training.n_jitted_steps, the step counter advances that many steps per call', modes=('train',))
      for freq in ('log_freq', 'eval_freq', 'snapshot_freq', 'snapshot_freq_for_preemption')),
)


@dataclasses.dataclass(frozen=True)
class _Range:
    """Number ``field`` must lie between ``low`` and ``high`` (``None``: no bound); an absent field is not checked.

    ``low_open`` / ``high_open`` exclude the bound itself, ``integer`` asks for an int, and ``modes`` are the
    ``--mode`` values the rule matters for.
    """

    field: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    modes: tuple[str, ...] = MODES

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        above = self.low is None or value > self.low or (value == self.low and not self.low_open)
        below = self.high is None or value < self.high or (value == self.high and not self.high_open)
        return above and below  # NaN is neither

    def allowed(self) -> str:
        bounds = [f'{sign} {bound:g}' for sign, bound in (('>' if self.low_open else '>=', self.low),
                                                           ('<' if self.high_open else '<=', self.high))
                  if bound is not None]
        return f'{"an integer" if self.integer else "a number"} {" and ".join(bounds)}'


_TRAIN = ('train',)
_RANGES: tuple[_Range, ...] = (
    _Range('model.nf', 1, integer=True),
    _Range('model.num_res_blocks', 0, integer=True),
    _Range('model.dropout', 0, 1, high_open=True),
    _Range('model.ema_rate', 0, 1),
    _Range('model.num_scales', 1, integer=True),
    _Range('model.sigma_min', 0, low_open=True),
    _Range('model.sigma_max', 0, low_open=True),
    _Range('model.beta_min', 0),
    _Range('model.beta_max', 0, low_open=True),
    _Range('data.image_size', 1, integer=True),
    _Range('data.num_channels', 1, integer=True),
    _Range('sampling.snr', 0),
    _Range('sampling.n_steps_each', 1, integer=True),
    _Range('training.n_iters', 1, integer=True, modes=_TRAIN),
    _Range('optim.lr', 0, low_open=True, modes=_TRAIN),
    _Range('optim.warmup', 0, integer=True, modes=_TRAIN),
    _Range('optim.beta1', 0, 1, high_open=True, modes=_TRAIN),
    _Range('optim.eps', 0, modes=_TRAIN),
    _Range('optim.weight_decay', 0, modes=_TRAIN),
    _Range('eval.num_samples', 1, integer=True, modes=('eval',)),
)


def _check_range(config, rule: _Range) -> str | None:
    value = _lookup(config, rule.field)
    if value is _MISSING or rule.contains(value):
        return None
    return f'config.{rule.field}={value!r} is out of range; allowed values: {rule.allowed()}'


def _check_choice(config, rule: _Choice) -> str | None:
    value = _lookup(config, rule.field)
    if value is _MISSING:
        if not rule.required:
            return None
        return f'config.{rule.field} is missing; allowed values: {", ".join(map(repr, rule.allowed()))}'
    allowed = list(rule.allowed())
    if isinstance(value, str) and rule.fold(value) in {rule.fold(a) for a in allowed}:
        return None
    return f'config.{rule.field}={value!r} is not allowed; allowed values: {", ".join(map(repr, allowed))}'


def _check_multiple(config, rule: _Multiple) -> str | None:
    value = _lookup(config, rule.field)
    divisor = rule.divisor(config)
    if divisor is None:
        return None
    if value is _MISSING:
        return f'config.{rule.field} is missing; allowed values: positive multiples of {divisor} ({rule.explain})'
    if isinstance(value, int) and value > 0 and divisor > 0 and value % divisor == 0:
        return None
    return (f'config.{rule.field}={value!r} is not a multiple of {divisor}; allowed values: positive multiples '
            f'of {divisor} ({rule.explain})')


def validate_config(config, mode: str = 'train') -> None:
    """Check ``config`` for ``main.py --mode=mode``; raise ``ValueError`` listing every problem found.

    Args:
      config: an ``ml_collections.ConfigDict`` as returned by a ``configs/**.py`` ``get_config()``.
      mode: ``'train'`` or ``'eval'``; some checks apply to one mode only (``eval.batch_size`` to eval,
        the ``training.*_freq`` / ``n_jitted_steps`` rule to train).

    Raises:
      ValueError: one line per problem: the field, its value and the allowed values.
    """
    if mode not in MODES:
        raise ValueError(f'mode={mode!r} is not allowed; allowed values: {", ".join(map(repr, MODES))}')
    problems = [_check_choice(config, rule) for rule in _CHOICES]
    problems += [_check_multiple(config, rule) for rule in _MULTIPLES if mode in rule.modes]
    problems += [_check_range(config, rule) for rule in _RANGES if mode in rule.modes]
    if _lookup(config, 'training.importance_weighting') is True:
        # score_flow's importance-sampled time exists for likelihood weighting on VP / sub-VP only.
        for field, ok, need in (('training.likelihood_weighting', _lookup(config, 'training.likelihood_weighting'),
                                 'True'),
                                ('training.continuous', _lookup(config, 'training.continuous'), 'True'),
                                ('training.sde', str(_lookup(config, 'training.sde')).lower() in ('vpsde', 'subvpsde'),
                                 "'vpsde' or 'subvpsde'")):
            if ok is not True:
                problems.append(f'config.training.importance_weighting=True needs config.{field}={need}; '
                                f'got {_lookup(config, field)!r} (or set importance_weighting=False)')
    problems = [p for p in problems if p is not None]
    if problems:
        raise ValueError('Invalid config (fix these fields, e.g. with --config.<field>=<value>):\n'
                         + '\n'.join(f'  {p}' for p in problems))


# ---------------------------------------------------------------------------------------------------------------
# Changes between runs of one workdir
# ---------------------------------------------------------------------------------------------------------------

SAFE_TO_CHANGE = (
    'training.n_iters', 'training.batch_size', 'training.n_jitted_steps', 'training.log_freq', 'training.eval_freq',
    'training.snapshot_freq', 'training.snapshot_freq_for_preemption', 'training.snapshot_sampling',
    'optim.lr', 'optim.warmup', 'optim.grad_clip', 'optim.weight_decay', 'optim.beta1', 'optim.eps',
    'model.ema_rate', 'model.remat', 'model.dtype', 'data.data_dir', 'sampling', 'eval', 'training.fuse_steps_with',
    'deq.n_iters',  # the dequantiser's run length (--mode train_deq), as training.n_iters
)
"""Fields (or whole sections) that may differ between the runs of one training workdir.

They change how training goes on, never what the checkpoints are: every other field (the SDE,
the model, the data, the loss, the optimizer's kind, the seed) defines the trained model.
"""

_ABSENT = '(absent)'


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
    """``{'section.field': value}`` of a nested dict (e.g. ``config.to_dict()``)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f'{prefix}.{key}' if prefix else str(key)))
    return flat


def _is_safe(field: str) -> bool:
    return any(field == safe or field.startswith(safe + '.') for safe in SAFE_TO_CHANGE)


def config_changes(old: dict, new: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """``(safe, unsafe)``: ``field -> (old value, new value)`` for every field that differs.

    A field present on one side only differs, with the value ``'(absent)'`` on the other; it counts
    as safe: the code gained or lost that field since ``old`` was written, which says nothing
    against the checkpoints (refusing it would strand every workdir of an older version).

    Args:
      old, new: configs as JSON dicts (``json.loads(config.to_json_best_effort())``, the form of a
        workdir's ``config.json``), so that tuples and lists compare equal.
    """
    old_flat, new_flat = flatten(old), flatten(new)
    safe: dict[str, tuple] = {}
    unsafe: dict[str, tuple] = {}
    for field in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(field, _ABSENT), new_flat.get(field, _ABSENT)
        if before != after:
            either_absent = _ABSENT in (before, after)
            (safe if either_absent or _is_safe(field) else unsafe)[field] = (before, after)
    return safe, unsafe
