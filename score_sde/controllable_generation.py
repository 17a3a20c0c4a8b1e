"""Controllable generation with PC samplers: inpainting, colorization, class-conditional sampling.

As in :mod:`sampling`, each task has a score-level function (a plain ``score_fn(x, t)``, pure and
traceable) and a model-level constructor with the original's API that runs data parallel over
the local devices (per-device keys ``(n_devices, 2)``, replicated state, per-device batches).

Inpainting and colorization replace, after every predictor and corrector step, the known part of
the state by a fresh draw of the forward-diffused known data ``x(t) ~ p_0t(· | data)`` (Song et
al. 2021, Appendix I). Class-conditional sampling adds the gradient of a noise-conditional
classifier ``∇_x log p_t(y | x)`` to the score (Appendix I.4).

Two details differ from the original code, both only in what the noise-free mean returned with
``denoise=True`` is made of: the original built ``x_mean`` from the already noised ``x`` for the
unknown part (so denoising did nothing there) and masked the prior sample in RGB instead of in the
decoupled colour space when starting colorization. Random numbers are otherwise drawn in the same
order as the original.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import sampling
import sde_lib
from models import utils as mutils
from score_sde import parallel
from sde_lib import ScoreFn, batch_mul

UpdateFn = sampling.UpdateFn


def _identity(x):
    return x


def _pc_update_pair(sde, score_fn, predictor, corrector, snr, n_steps, probability_flow):
    return sampling.pc_update_fns(sde, score_fn, predictor, corrector, snr, n_steps, probability_flow)


# --------------------------------------------------------------------------- inpainting


def _inpaint_update(update_fn: UpdateFn, sde: sde_lib.SDE, data: jax.Array, mask: jax.Array) -> UpdateFn:
    """Wrap a predictor/corrector update so that known pixels (``mask == 1``) follow the noised data."""

    def inpaint_update_fn(rng, x, t):
        rng, step_rng = jax.random.split(rng)
        x, x_mean = update_fn(step_rng, x, t)
        known_mean, std = sde.marginal_prob(data, t)
        known = known_mean + batch_mul(jax.random.normal(rng, x.shape), std)
        return x * (1.0 - mask) + known * mask, x_mean * (1.0 - mask) + known_mean * mask

    return inpaint_update_fn


def pc_inpaint(rng: jax.Array, score_fn: ScoreFn, sde: sde_lib.SDE, data: jax.Array, mask: jax.Array,
               predictor: Optional[type], corrector: Optional[type], snr: float, n_steps: int = 1,
               probability_flow: bool = False, denoise: bool = True, eps: float = 1e-5) -> jax.Array:
    """Fill the pixels where ``mask == 0`` given ``data`` where ``mask == 1``; pure and traceable.

    Args:
        rng: PRNG key.
        score_fn: ``score_fn(x, t)`` of the unconditional model.
        sde: forward SDE (its ``N`` sets the steps).
        data: ``(batch, H, W, C)`` images (values under ``mask == 0`` are ignored).
        mask: ``{0, 1}`` array broadcastable to ``data``; 1 marks known pixels.
        predictor, corrector, snr, n_steps, probability_flow, denoise, eps: as :func:`sampling.pc_sample`.

    Returns:
        Completed images, shape of ``data``.
    """
    corrector_update, predictor_update = _pc_update_pair(sde, score_fn, predictor, corrector, snr, n_steps,
                                                         probability_flow)
    rng, step_rng = jax.random.split(rng)
    x = data * mask + sde.prior_sampling(step_rng, data.shape) * (1.0 - mask)
    x, x_mean = sampling.pc_loop(rng, x, sde, eps, _inpaint_update(corrector_update, sde, data, mask),
                                 _inpaint_update(predictor_update, sde, data, mask))
    return x_mean if denoise else x


def get_score_pc_inpainter(sde, score_fn, predictor, corrector, inverse_scaler=_identity, snr=0.16, n_steps=1,
                           probability_flow=False, denoise=True, eps=1e-5) -> Callable:
    """Jitted ``inpainter(rng, data, mask) -> images`` for a fixed ``score_fn`` (no devices axis)."""
    sampling.validate_pc(sde, predictor, corrector, probability_flow, snr, n_steps)
    return jax.jit(lambda rng, data, mask: inverse_scaler(pc_inpaint(
        rng, score_fn, sde, data, mask, predictor, corrector, snr, n_steps, probability_flow, denoise, eps)))


def get_pc_inpainter(sde, model, predictor, corrector, inverse_scaler, snr,
                     n_steps=1, probability_flow=False, continuous=False,
                     denoise=True, eps=1e-5):
    """Create an image inpainting function that uses PC samplers.

    Args:
        sde: forward SDE.
        model: Flax score model.
        predictor, corrector: :class:`sampling.Predictor` / :class:`sampling.Corrector` subclasses or None.
        inverse_scaler: maps model space back to data space.
        snr, n_steps: corrector settings.
        probability_flow: predictor steps the probability-flow ODE.
        continuous: the model was trained with continuous time.
        denoise: return the noise-free mean of the last step.
        eps: last time of the reverse integration.

    Returns:
        pmapped ``inpainter(rng, state, data, mask) -> images``: ``rng`` ``(n_devices, 2)``,
        replicated ``state``, ``data`` and ``mask`` ``(n_devices, batch, H, W, C)`` (mask 1 = known).
    """
    sampling.validate_pc(sde, predictor, corrector, probability_flow, snr, n_steps)

    def pc_inpainter(rng, state, data, mask):
        score_fn = mutils.get_score_fn(sde, model, state.params_ema, state.model_state, train=False,
                                       continuous=continuous)
        return inverse_scaler(pc_inpaint(rng, score_fn, sde, data, mask, predictor, corrector, snr, n_steps,
                                         probability_flow, denoise, eps))

    return parallel.pmap(pc_inpainter)


# --------------------------------------------------------------------------- colorization


def colour_decoupling_matrix() -> jax.Array:
    """The orthonormal ``M`` (3, 3) whose first column is the grey direction ``(1, 1, 1)/√3``.

    Columns: ``(1, 1, 1)/√3``, ``(-2, 1, 1)/√6``, ``(0, 1, -1)/√2`` — the original's matrix.
    ``decouple(x) = x @ M`` puts the grey level ``(r + g + b)/√3`` in channel 0.
    """
    m = np.stack([np.array([1.0, 1.0, 1.0]) / np.sqrt(3.0), np.array([-2.0, 1.0, 1.0]) / np.sqrt(6.0),
                  np.array([0.0, 1.0, -1.0]) / np.sqrt(2.0)], axis=1)
    return jnp.asarray(m, jnp.float32)


def decouple(inputs: jax.Array) -> jax.Array:
    """RGB ``(..., 3)`` -> decoupled channels ``(grey, chroma_1, chroma_2)``."""
    return jnp.einsum("...i,ij->...j", inputs, colour_decoupling_matrix())


def couple(inputs: jax.Array) -> jax.Array:
    """Inverse of :func:`decouple` (``M`` is orthonormal, so its inverse is its transpose)."""
    return jnp.einsum("...i,ji->...j", inputs, colour_decoupling_matrix())


def _grey_mask(image: jax.Array) -> jax.Array:
    """1 on the decoupled grey channel, 0 on the two chroma channels; shape of ``image``."""
    return jnp.concatenate([jnp.ones_like(image[..., :1]), jnp.zeros_like(image[..., 1:])], axis=-1)


def _colorize_update(update_fn: UpdateFn, sde: sde_lib.SDE, gray_scale_img: jax.Array) -> UpdateFn:
    """Wrap an update so that the decoupled grey channel follows the noised grey image."""
    grey = decouple(gray_scale_img)

    def colorization_update_fn(rng, x, t):
        mask = _grey_mask(x)
        rng, step_rng = jax.random.split(rng)
        x, x_mean = update_fn(step_rng, x, t)
        known_mean, std = sde.marginal_prob(grey, t)
        known = known_mean + batch_mul(jax.random.normal(rng, x.shape), std)
        x = couple(decouple(x) * (1.0 - mask) + known * mask)
        x_mean = couple(decouple(x_mean) * (1.0 - mask) + known_mean * mask)
        return x, x_mean

    return colorization_update_fn


def pc_colorize(rng: jax.Array, score_fn: ScoreFn, sde: sde_lib.SDE, gray_scale_img: jax.Array,
                predictor: Optional[type], corrector: Optional[type], snr: float, n_steps: int = 1,
                probability_flow: bool = False, denoise: bool = True, eps: float = 1e-5) -> jax.Array:
    """Colorize grey images ``(batch, H, W, 3)`` (R = G = B); pure and traceable.

    The decoupled grey channel ``(r + g + b)/√3`` is fixed to the input's; the two chroma channels
    are sampled. Other arguments as :func:`pc_inpaint`.
    """
    corrector_update, predictor_update = _pc_update_pair(sde, score_fn, predictor, corrector, snr, n_steps,
                                                         probability_flow)
    mask = _grey_mask(gray_scale_img)
    rng, step_rng = jax.random.split(rng)
    prior = sde.prior_sampling(step_rng, gray_scale_img.shape)
    x = couple(decouple(gray_scale_img) * mask + decouple(prior) * (1.0 - mask))
    x, x_mean = sampling.pc_loop(rng, x, sde, eps, _colorize_update(corrector_update, sde, gray_scale_img),
                                 _colorize_update(predictor_update, sde, gray_scale_img))
    return x_mean if denoise else x


def get_score_pc_colorizer(sde, score_fn, predictor, corrector, inverse_scaler=_identity, snr=0.16, n_steps=1,
                           probability_flow=False, denoise=True, eps=1e-5) -> Callable:
    """Jitted ``colorizer(rng, gray_scale_img) -> images`` for a fixed ``score_fn``."""
    sampling.validate_pc(sde, predictor, corrector, probability_flow, snr, n_steps)
    return jax.jit(lambda rng, grey: inverse_scaler(pc_colorize(
        rng, score_fn, sde, grey, predictor, corrector, snr, n_steps, probability_flow, denoise, eps)))


def get_pc_colorizer(sde, model, predictor, corrector, inverse_scaler,
                     snr, n_steps=1, probability_flow=False, continuous=False,
                     denoise=True, eps=1e-5):
    """Create an image colorization function based on PC sampling.

    Arguments as :func:`get_pc_inpainter`. Returns pmapped ``colorizer(rng, state, gray_scale_img)``
    with ``gray_scale_img`` ``(n_devices, batch, H, W, 3)`` whose three channels are equal.
    """
    sampling.validate_pc(sde, predictor, corrector, probability_flow, snr, n_steps)

    def pc_colorizer(rng, state, gray_scale_img):
        score_fn = mutils.get_score_fn(sde, model, state.params_ema, state.model_state, train=False,
                                       continuous=continuous)
        return inverse_scaler(pc_colorize(rng, score_fn, sde, gray_scale_img, predictor, corrector, snr, n_steps,
                                          probability_flow, denoise, eps))

    return parallel.pmap(pc_colorizer)


# --------------------------------------------------------------------------- class-conditional sampling

ClassifierGradFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def pc_conditional_sample(rng: jax.Array, score_fn: ScoreFn, classifier_grad_fn: ClassifierGradFn,
                          sde: sde_lib.SDE, shape, labels: jax.Array, predictor: Optional[type],
                          corrector: Optional[type], snr: float, n_steps: int = 1, probability_flow: bool = False,
                          denoise: bool = True, eps: float = 1e-5) -> jax.Array:
    """Sample ``p_0(x | labels)`` with the score ``∇ log p_t(x) + ∇ log p_t(labels | x)``; traceable.

    Args:
        score_fn: unconditional ``score_fn(x, t)``.
        classifier_grad_fn: ``classifier_grad_fn(x, t, labels)`` = ``∇_x log p_t(labels | x)``, shape of x.
        shape: ``(batch, ...)``; ``labels`` ``(batch,)`` int.
        Others as :func:`sampling.pc_sample`.
    """

    def total_score(x, t):
        return score_fn(x, t) + classifier_grad_fn(x, t, labels)

    return sampling.pc_sample(rng, total_score, sde, shape, predictor, corrector, snr, n_steps, probability_flow,
                              denoise, eps)


def get_score_pc_conditional_sampler(sde, score_fn, classifier_grad_fn, shape, predictor, corrector,
                                     inverse_scaler=_identity, snr=0.16, n_steps=1, probability_flow=False,
                                     denoise=True, eps=1e-5) -> Callable:
    """Jitted ``sampler(rng, labels) -> samples`` for fixed score and classifier-gradient functions."""
    sampling.validate_pc(sde, predictor, corrector, probability_flow, snr, n_steps)
    return jax.jit(lambda rng, labels: inverse_scaler(pc_conditional_sample(
        rng, score_fn, classifier_grad_fn, sde, shape, labels, predictor, corrector, snr, n_steps, probability_flow,
        denoise, eps)))


def noise_conditional_classifier_grad_fn(sde: sde_lib.SDE, classifier, classifier_params) -> ClassifierGradFn:
    """``classifier_grad_fn(x, t, labels)`` of a classifier conditioned on the noise scale ``std(t)``.

    The classifier sees ``sde.marginal_prob(x, t)[1]`` (for VE: ``σ(t)``) and CIFAR-10-normalised
    images, through :func:`models.utils.get_logit_fn`.
    """
    grad_fn = mutils.get_classifier_grad_fn(mutils.get_logit_fn(classifier, classifier_params))

    def classifier_grad_fn(x, t, labels):
        return grad_fn(x, sde.marginal_prob(x, t)[1], labels)

    return classifier_grad_fn


def get_pc_conditional_sampler(sde, score_model, classifier, classifier_params, shape,
                               predictor, corrector, inverse_scaler, snr,
                               n_steps=1, probability_flow=False,
                               continuous=False, denoise=True, eps=1e-5):
    """Class-conditional sampling with PC samplers and a noise-conditional classifier.

    Args:
        sde: forward SDE.
        score_model: Flax score model.
        classifier: Flax noise-conditional classifier (``models.utils.create_classifier``).
        classifier_params: its parameters.
        shape: one device's sample batch ``(batch, H, W, C)``.
        predictor, corrector, inverse_scaler, snr, n_steps, probability_flow, continuous, denoise, eps:
            as :func:`sampling.get_pc_sampler`.

    Returns:
        pmapped ``sampler(rng, score_state, labels) -> samples`` with ``labels`` ``(n_devices, batch)``.
    """
    sampling.validate_pc(sde, predictor, corrector, probability_flow, snr, n_steps)
    classifier_grad_fn = noise_conditional_classifier_grad_fn(sde, classifier, classifier_params)

    def pc_conditional_sampler(rng, score_state, labels):
        score_fn = mutils.get_score_fn(sde, score_model, score_state.params_ema, score_state.model_state,
                                       train=False, continuous=continuous)
        return inverse_scaler(pc_conditional_sample(rng, score_fn, classifier_grad_fn, sde, shape, labels,
                                                    predictor, corrector, snr, n_steps, probability_flow, denoise,
                                                    eps))

    return parallel.pmap(pc_conditional_sampler)
