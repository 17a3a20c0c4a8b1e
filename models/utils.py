"""The bridge from (model, params, SDE) to a time-dependent ``score_fn(x, t)``.

Also home of the model registry, the training :class:`State`, noise schedules used by
the architectures, and the noise-conditional classifier helpers for class-conditional
sampling.
"""
from __future__ import annotations

import copy
import functools
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

import sde_lib
from score_sde import checkpoints, registry
from sde_lib import batch_mul


@flax.struct.dataclass
class State:
    """Everything a training run carries from step to step (one replica's view).

    Attributes:
        step: number of optimizer steps taken.
        params: trainable parameters (the original's ``optimizer.target``).
        opt_state: optax optimizer state (Adam moments, ...).
        lr: the configured base learning rate (warmup scales it per step).
        model_state: non-trainable variable collections (empty for all score models).
        ema_rate: decay of the exponential moving average of the parameters.
        params_ema: EMA of ``params``; evaluation and sampling use these.
        rng: PRNG key for the next step.
    """

    step: int
    params: Any
    opt_state: Any
    lr: float
    model_state: Any
    ema_rate: float
    params_ema: Any
    rng: Any


_MODELS = registry.Registry("model", "config.model.name")
register_model = _MODELS.register


def _import_architectures() -> None:
    """Import every architecture module so that their ``@register_model`` decorators run."""
    import models  # noqa: F401  (models/__init__.py imports the architectures)


def registered_models() -> list[str]:
    """Names accepted by :func:`get_model` (``config.model.name``)."""
    _import_architectures()
    return _MODELS.names()


def get_model(name: str) -> type:
    """The Flax module class registered as ``name``."""
    _import_architectures()
    return _MODELS.get(name)


def get_sigmas(config) -> jax.Array:
    """SMLD noise levels: ``num_scales`` values geometric from ``sigma_max`` down to ``sigma_min``."""
    return jnp.exp(jnp.linspace(jnp.log(config.model.sigma_max), jnp.log(config.model.sigma_min),
                                config.model.num_scales))


def get_ddpm_params(config) -> dict:
    """DDPM's discrete schedule (float64 numpy): betas, alphas and their cumulative products.

    The number of diffusion steps is fixed to 1000 as in the original, with
    ``beta_i`` linear from ``beta_min/num_scales`` to ``beta_max/num_scales``.
    """
    num_diffusion_timesteps = 1000
    beta_start = config.model.beta_min / config.model.num_scales
    beta_end = config.model.beta_max / config.model.num_scales
    betas = np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_1m_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "beta_min": beta_start * (num_diffusion_timesteps - 1),
        "beta_max": beta_end * (num_diffusion_timesteps - 1),
        "num_diffusion_timesteps": num_diffusion_timesteps,
    }


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
"""Values of ``config.model.dtype``: the dtype the network computes in (parameters are always float32)."""


def compute_dtype(config) -> jnp.dtype:
    """The network's compute dtype, ``config.model.dtype`` (float32 when the config has no such field).

    With ``'bfloat16'`` the convolutions, dense layers and attention run in bfloat16 on float32
    parameters (cast where used, so gradients, optimizer state and EMA stay float32); normalisation
    statistics, the softmax and the time embedding's sines stay float32 and the output is float32.
    """
    name = config.model.get("dtype", "float32")
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"config.model.dtype={name!r} is not supported; choose one of {list(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[name]


def float32_model(model):
    """``model`` computing in float32 whatever its ``config.model.dtype``: same parameters, same outputs up to
    the rounding of bfloat16 (for samplers and bits/dim, which integrate many network evaluations)."""
    if model.config.model.get("dtype", "float32") == "float32":
        return model
    config = copy.deepcopy(model.config)
    config.model.dtype = "float32"
    return model.clone(config=config)


def model_input_shape(config, batch_size: int = 1) -> tuple:
    """``(batch, image_size, image_size, num_channels)`` as the config describes the data."""
    return (batch_size, config.data.image_size, config.data.image_size, config.data.num_channels)


def create_model(config):
    """An un-initialised instance of ``config.model.name`` bound to ``config``."""
    return get_model(config.model.name)(config=config)


def init_inputs(rng: jax.Array, config) -> tuple[dict, jax.Array, jax.Array]:
    """The arguments of :func:`jitted_init`: ``(rngs, x, labels)``, a zero image ``(1, H, W, C)`` and label ``(1,)``.

    ``rngs`` is ``{'params', 'dropout'}``, the two halves of ``jax.random.split(rng)``.
    """
    params_rng, dropout_rng = jax.random.split(rng)
    fake_input = jnp.zeros(model_input_shape(config))
    fake_label = jnp.zeros((1,), dtype=jnp.int32)
    return {"params": params_rng, "dropout": dropout_rng}, fake_input, fake_label


def jitted_init(model) -> Callable:
    """``model.init`` in evaluation mode as one jitted program, called with :func:`init_inputs`.

    Compiled as one program: run op by op, every initializer of every distinct shape compiles
    on its own (minutes on a CPU for a model of ~50 convolutions). Callers that compile it ahead
    (``score_sde.train_programs``) pass the same function object to :func:`init_model`, whose call
    then reuses the program JAX holds in memory.
    """
    return jax.jit(functools.partial(model.init, train=False))


def init_model(rng: jax.Array, config, *, model=None, init_fn: Callable | None = None):
    """Create and initialise the model of ``config``.

    Args:
        rng: the initialisation key (split by :func:`init_inputs`).
        config: the run's config.
        model: the module of ``config`` if already created (:func:`create_model`).
        init_fn: :func:`jitted_init` of ``model`` if already made (and maybe compiled).

    Returns:
        ``(model, init_model_state, initial_params)``: the Flax module, its non-parameter
        collections (a dict, usually empty) and its parameter tree.
    """
    model = model if model is not None else create_model(config)
    init_fn = init_fn if init_fn is not None else jitted_init(model)
    variables = flax.core.unfreeze(init_fn(*init_inputs(rng, config)))
    initial_params = variables.pop("params")
    return model, variables, initial_params


def get_model_fn(model, params, states, train: bool = False) -> Callable:
    """``model_fn(x, labels, rng=None) -> (output, new_states)`` for fixed variables.

    Args:
        model: a Flax module (see :func:`get_model`).
        params: its parameter tree.
        states: its other variable collections (dict; may be empty).
        train: training mode (dropout on, mutable collections updated) or evaluation.
    """
    states = dict(states or {})

    def model_fn(x, labels, rng=None):
        variables = {"params": params, **states}
        if not train:
            return model.apply(variables, x, labels, train=False, mutable=False), states
        return model.apply(variables, x, labels, train=True, mutable=list(states.keys()), rngs={"dropout": rng})

    return model_fn


def get_score_fn(sde, model, params, states, train: bool = False, continuous: bool = False,
                 return_state: bool = False) -> Callable:
    """Wrap the model so that its output is the score ``∇_x log p_t(x)``.

    Time conditioning follows the original exactly:

    * VP / sub-VP, continuous (sub-VP always): label ``999·t``; output scaled by ``-1/std(t)``.
    * VP, discrete: label ``t·(N-1)``; output scaled by ``-1/sqrt(1 - ᾱ_i)``.
    * VE, continuous: label ``σ(t)``; the output is the score.
    * VE, discrete: label ``round((T - t)·(N-1))`` (t = 0 is the largest noise level).

    Returns:
        ``score_fn(x, t, rng=None)`` with x (batch, H, W, C) and t (batch,); returns the
        score (and the new model state if ``return_state``).
    """
    model_fn = get_model_fn(model, params, states, train=train)

    if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
        def score_fn(x, t, rng=None):
            if continuous or isinstance(sde, sde_lib.subVPSDE):
                labels = t * 999
                output, state = model_fn(x, labels, rng)
                # score_flow's high precision: at t ~ 1e-5, where importance-sampled times cluster,
                # float32 1 - exp(...) would put a few percent of error on std.
                std = sde.marginal_prob_high_precision(jnp.zeros_like(x), t)[1]
            else:
                labels = t * (sde.N - 1)
                output, state = model_fn(x, labels, rng)
                std = sde.sqrt_1m_alphas_cumprod[labels.astype(jnp.int32)]
            score = batch_mul(-output, 1.0 / std)
            return (score, state) if return_state else score

    elif isinstance(sde, sde_lib.VESDE):
        def score_fn(x, t, rng=None):
            if continuous:
                labels = sde.marginal_prob(jnp.zeros_like(x), t)[1]
            else:
                labels = jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32)
            score, state = model_fn(x, labels, rng)
            return (score, state) if return_state else score

    else:
        raise NotImplementedError(f"SDE class {type(sde).__name__} is not supported by get_score_fn.")

    return score_fn


def to_flattened_numpy(x) -> np.ndarray:
    """Flatten a JAX array into a 1-D numpy array (for scipy's ODE solvers)."""
    return np.asarray(x).reshape((-1,))


def from_flattened_numpy(x, shape) -> jax.Array:
    """Reshape a flat numpy array into a JAX array of ``shape``."""
    return jnp.asarray(x).reshape(shape)


# The noise-conditional classifier of the original's class-conditional CIFAR-10 sampling.
_CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
_CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)


def create_classifier(prng_key, batch_size: int, ckpt_path: str | None = None, random_init: bool = False):
    """Create the noise-conditional Wide-ResNet classifier (CIFAR-10, 32×32×3, 10 classes).

    Args:
        prng_key: PRNG key for initialisation.
        batch_size: batch size used to initialise.
        ckpt_path: the classifier's checkpoint: a ``checkpoint_<n>`` file of its parameters (flax msgpack, as the
            original's released classifier; flax 0.3.1's ``(1, 1, 1, C)`` GroupNorm leaves are reshaped), or a
            folder holding such files (the newest is read).
        random_init: keep the freshly initialised parameters instead (tests only: the gradients of an untrained
            classifier make class-conditional samples meaningless).

    Returns:
        ``(classifier, classifier_params)``.

    Raises:
        ValueError: neither or both of ``ckpt_path`` and ``random_init``; a checkpoint of another architecture.
        FileNotFoundError: ``ckpt_path`` does not exist or holds no ``checkpoint_<n>`` file.
    """
    if (ckpt_path is None) != random_init:
        raise ValueError(f"create_classifier(ckpt_path={ckpt_path!r}, random_init={random_init}): give the "
                         "classifier's checkpoint as ckpt_path, or random_init=True for untrained weights (tests).")
    from models import wideresnet_noise_conditional  # noqa: PLC0415 (the architectures import this module)

    classifier = wideresnet_noise_conditional.WideResnet(blocks_per_group=4, channel_multiplier=10, num_outputs=10)
    variables = classifier.init({"params": prng_key, "dropout": jax.random.PRNGKey(0)},
                                jnp.ones((batch_size, 32, 32, 3), jnp.float32),
                                jnp.ones((batch_size,), jnp.float32), train=False)
    params = flax.core.unfreeze(variables)["params"]
    if random_init:
        return classifier, params
    path = checkpoints.latest_checkpoint(ckpt_path) if os.path.isdir(ckpt_path) else ckpt_path
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"No classifier checkpoint at {ckpt_path} (a checkpoint_<n> file, or a folder "
                                "holding one); create_classifier's ckpt_path must name the trained classifier.")
    return classifier, _classifier_params(checkpoints.read_raw(path), params, path)


def _classifier_params(raw: dict, template: dict, path: str) -> dict:
    """The parameter tree ``raw`` read from ``path``, checked against and cast like ``template``; flax 0.3.1's
    GroupNorm ``scale`` / ``bias`` of shape ``(1, 1, 1, C)`` become ``(C,)``."""
    flat_raw = flax.traverse_util.flatten_dict(raw)
    flat_template = flax.traverse_util.flatten_dict(template)
    if flat_raw.keys() != flat_template.keys():
        missing = sorted("/".join(k) for k in flat_template.keys() - flat_raw.keys())
        unexpected = sorted("/".join(k) for k in flat_raw.keys() - flat_template.keys())
        raise ValueError(f"{path} is not a checkpoint of the WRN-28-10 classifier's parameters: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}; give create_classifier that classifier's file.")
    params = {}
    for key, want in flat_template.items():
        value = np.asarray(flat_raw[key])
        if value.shape == (1, 1, 1) + want.shape:
            value = value.reshape(want.shape)
        if value.shape != want.shape:
            raise ValueError(f"{path}: classifier parameter {'/'.join(key)} has shape {value.shape}, the WRN-28-10 "
                             f"classifier's is {want.shape}; give create_classifier that classifier's file.")
        params[key] = jnp.asarray(value, want.dtype)
    return flax.traverse_util.unflatten_dict(params)


def get_logit_fn(classifier, classifier_params) -> Callable:
    """``logit_fn(data, ve_noise_scale) -> logits`` with CIFAR-10 normalisation applied to ``data``."""
    mean = jnp.asarray(_CIFAR10_MEAN)
    std = jnp.asarray(_CIFAR10_STD)

    def logit_fn(data, ve_noise_scale):
        return classifier.apply({"params": classifier_params}, (data - mean) / std, ve_noise_scale,
                                train=False, mutable=False)

    return logit_fn


def get_classifier_grad_fn(logit_fn) -> Callable:
    """``grad_fn(data, ve_noise_scale, labels)`` = ∇_data Σ_i log p(labels_i | data_i, σ)."""

    def grad_fn(data, ve_noise_scale, labels):
        def log_prob(d):
            logp = jax.nn.log_softmax(logit_fn(d, ve_noise_scale), axis=-1)
            return logp[jnp.arange(labels.shape[0]), labels].sum()

        return jax.grad(log_prob)(data)

    return grad_fn
