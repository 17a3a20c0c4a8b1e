"""Sample-quality metrics from features: Inception Score, FID and KID (numpy / scipy, float64).

The formulas follow ``tensorflow_gan.eval`` (which no longer imports on current TensorFlow):

* Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` — :func:`classifier_score_from_logits`;
* FID ``|m - m_w|² + tr(C + C_w - 2 (C^½ C_w C^½)^½)`` with unbiased covariances —
  :func:`frechet_classifier_distance_from_activations`. The matrix square roots use
  symmetric eigendecompositions (``C^½ C_w C^½`` is symmetric PSD, so only its eigenvalues
  are needed), several times faster than ``scipy.linalg.sqrtm`` at 2048 dimensions;
* KID — the unbiased block estimator of the squared MMD with the polynomial kernel
  ``k(x, y) = (xᵀy / d + 1)³`` (blocks of at most 1024 as tfgan) —
  :func:`kernel_classifier_distance_from_activations`.

Every function takes plain arrays and touches no file or network. Bad input (NaN or infinite
values, empty or mis-shaped arrays, a covariance that is not positive semi-definite) raises a
``ValueError`` naming the argument, instead of a NaN, a ``LinAlgError`` or a wrong number.
"""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

# Relative size (to the largest eigenvalue) of a negative eigenvalue still taken as round-off
# of a positive semi-definite matrix. Round-off of eigh is ~D·eps·|C| (about 5e-13 at D = 2048).
_PSD_TOLERANCE = 1e-8


def _check_features(name: str, x, min_rows: int = 1) -> np.ndarray:
    """``x`` as a float64 ``(N, D)`` array with ``N >= min_rows``, ``D >= 1`` and finite values."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D); got shape {x.shape}.")
    if x.shape[0] < min_rows or x.shape[1] == 0:
        raise ValueError(f"{name} has shape {x.shape}; at least {min_rows} row(s) of at least 1 value are needed.")
    bad_rows = int(np.sum(~np.all(np.isfinite(x), axis=1)))
    if bad_rows:
        raise ValueError(f"{name} holds NaN or infinite values in {bad_rows} of {x.shape[0]} rows; the samples "
                         "or the feature network produced them (check the model's samples for NaN).")
    return x


def classifier_score_from_logits(logits: np.ndarray) -> float:
    """Inception Score ``exp(mean_x KL(softmax(logits_x) || mean_x softmax(logits_x)))``.

    A class whose probability underflows to 0 for an image contributes ``0·log 0 = 0`` to that
    image's KL term (its limit); tfgan's implementation returns NaN there instead.

    Args:
        logits: ``(N, K)``, N >= 1, finite.

    Raises:
        ValueError: ``logits`` is not 2-D, empty, or holds NaN / infinite values.
    """
    logits = _check_features("logits", logits)
    log_p = log_softmax(logits, axis=1)
    p = np.exp(log_p)
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0 of an all-underflowed class; masked below
        log_q = np.log(p.mean(axis=0))
        kl = np.sum(np.where(p > 0, p * (log_p - log_q), 0.0), axis=1)
    return float(np.exp(kl.mean()))


def symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root ``(D, D)`` of a symmetric positive semi-definite ``(D, D)`` matrix by eigendecomposition.

    Every negative eigenvalue is clipped to 0, whatever its size: meant for round-off of a PSD
    matrix. It does not check its input; :func:`frechet_distance` checks the covariances first.
    """
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma: np.ndarray, sigma_w: np.ndarray) -> float:
    """``tr((sigma · sigma_w)^½)`` for symmetric PSD ``(D, D)`` matrices.

    ``sigma·sigma_w`` has the eigenvalues of the symmetric PSD ``A·sigma_w·A`` with
    ``A = sigma^½``, so the trace is the sum of the square roots of those eigenvalues:
    one ``eigh`` for ``A`` and one ``eigvalsh`` (negative round-off eigenvalues clipped to 0).
    """
    root = symmetric_sqrt(sigma)
    inner = root @ sigma_w @ root
    inner = 0.5 * (inner + inner.T)
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None))))


def gaussian_statistics(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of finite ``(N >= 2, D)`` activations."""
    activations = _check_features("activations", activations, min_rows=2)
    mu = activations.mean(axis=0)
    centered = activations - mu
    return mu, centered.T @ centered / (activations.shape[0] - 1)


def _check_covariance(name: str, sigma, dim: int) -> np.ndarray:
    sigma = np.asarray(sigma, np.float64)
    if sigma.shape != (dim, dim):
        raise ValueError(f"{name} must have shape ({dim}, {dim}) to match the means; got {sigma.shape}.")
    if not np.all(np.isfinite(sigma)):
        raise ValueError(f"{name} holds NaN or infinite values.")
    scale = max(float(np.max(np.abs(sigma))), np.finfo(np.float64).tiny)
    if np.max(np.abs(sigma - sigma.T)) > _PSD_TOLERANCE * scale:
        raise ValueError(f"{name} is not symmetric, so it is not a covariance matrix.")
    smallest = float(np.linalg.eigvalsh(sigma)[0])
    if smallest < -_PSD_TOLERANCE * scale:
        raise ValueError(f"{name} is not positive semi-definite (smallest eigenvalue {smallest:.3g}), so it is "
                         "not a covariance matrix; FID would come out wrong (e.g. 0).")
    return sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); means ``(D,)``, covariances ``(D, D)``.

    Raises:
        ValueError: an argument is mis-shaped or non-finite, or a covariance is not symmetric
            positive semi-definite.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one length; got shapes {mu1.shape} and {mu2.shape}.")
    for name, mu in (("mu1", mu1), ("mu2", mu2)):
        if not np.all(np.isfinite(mu)):
            raise ValueError(f"{name} holds NaN or infinite values.")
    sigma1 = _check_covariance("sigma1", sigma1, mu1.shape[0])
    sigma2 = _check_covariance("sigma2", sigma2, mu1.shape[0])
    mean_term = float(np.sum(np.square(mu1 - mu2)))
    trace_term = float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return trace_term + mean_term


def frechet_classifier_distance_from_activations(real_activations: np.ndarray,
                                                 generated_activations: np.ndarray) -> float:
    """FID between the Gaussians fitted to two sets of finite activations ``(N >= 2, D)``, ``(M >= 2, D)``."""
    real = _check_features("real_activations", real_activations, min_rows=2)
    gen = _check_features("generated_activations", generated_activations, min_rows=2)
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"real_activations and generated_activations differ in width: {real.shape} and "
                         f"{gen.shape}; they must come from the same feature network.")
    mu1, sigma1 = gaussian_statistics(real)
    mu2, sigma2 = gaussian_statistics(gen)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def kernel_classifier_distance_and_std_from_activations(real_activations: np.ndarray,
                                                        generated_activations: np.ndarray,
                                                        max_block_size: int = 1024) -> tuple[float, float]:
    """KID: unbiased squared MMD with kernel ``(xᵀy / D + 1)³``, averaged over blocks.

    Both sets ``(N, D)`` and ``(M, D)`` are split into the same number of contiguous blocks
    (sizes differing by at most one, none over ``max_block_size``), as tfgan does; each block
    gives an unbiased estimate (diagonal terms of the within-set kernels left out).

    Returns:
        ``(kid, standard error)``; the error is NaN with a single block.

    Raises:
        ValueError: an input is empty, mis-shaped or non-finite, ``max_block_size < 2``, or a
            block would hold fewer than 2 activations.
    """
    real = _check_features("real_activations", real_activations)
    gen = _check_features("generated_activations", generated_activations)
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"real_activations and generated_activations differ in width: {real.shape} and "
                         f"{gen.shape}; they must come from the same feature network.")
    if int(max_block_size) != max_block_size or max_block_size < 2:
        raise ValueError(f"max_block_size = {max_block_size!r}; it must be an integer >= 2 (KID needs at least "
                         "2 activations per block).")
    dim = real.shape[1]
    n_blocks = int(np.ceil(max(real.shape[0], gen.shape[0]) / max_block_size))

    def bounds(n: int) -> np.ndarray:
        base, extra = divmod(n, n_blocks)
        sizes = np.array([base] * (n_blocks - extra) + [base + 1] * extra)
        return np.concatenate([[0], np.cumsum(sizes)])

    inds_r, inds_g = bounds(real.shape[0]), bounds(gen.shape[0])
    estimates = []
    for i in range(n_blocks):
        r = real[inds_r[i]:inds_r[i + 1]]
        g = gen[inds_g[i]:inds_g[i + 1]]
        m, n = r.shape[0], g.shape[0]
        if m < 2 or n < 2:
            raise ValueError(f"KID needs at least 2 activations per block; got {m} real and {n} generated "
                             f"(N = {real.shape[0]}, M = {gen.shape[0]} in {n_blocks} block(s)).")
        k_rr = (r @ r.T / dim + 1.0) ** 3
        k_rg = (r @ g.T / dim + 1.0) ** 3
        k_gg = (g @ g.T / dim + 1.0) ** 3
        estimates.append(-2.0 * k_rg.mean()
                         + (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
                         + (k_gg.sum() - np.trace(k_gg)) / (n * (n - 1)))
    estimates = np.asarray(estimates)
    mean = float(estimates.mean())
    std = float(np.sqrt(estimates.var(ddof=1) / n_blocks)) if n_blocks > 1 else float("nan")
    return mean, std


def kernel_classifier_distance_from_activations(real_activations: np.ndarray, generated_activations: np.ndarray,
                                                max_block_size: int = 1024) -> float:
    """KID (see :func:`kernel_classifier_distance_and_std_from_activations`)."""
    return kernel_classifier_distance_and_std_from_activations(real_activations, generated_activations,
                                                               max_block_size)[0]


def compute_metrics(sample_pools: np.ndarray, sample_logits: np.ndarray | None, data_pools: np.ndarray) -> dict:
    """``{'IS', 'fid', 'kid'}`` of samples ``(M, D)`` (logits ``(M, K)``) against dataset activations ``(N, D)``.

    IS is NaN without logits.
    """
    inception_score = (classifier_score_from_logits(sample_logits) if sample_logits is not None
                       else float("nan"))
    return {"IS": inception_score,
            "fid": frechet_classifier_distance_from_activations(data_pools, sample_pools),
            "kid": kernel_classifier_distance_from_activations(data_pools, sample_pools)}
