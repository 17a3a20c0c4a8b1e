"""The work of ``run_lib.evaluate`` for one checkpoint: eval loss, bits/dim, the likelihood bound, samples and metrics.

:func:`build_job` prepares once what ``config.eval.enable_*`` asks for (an :class:`EvalJob`: models,
data, compiled functions); :func:`evaluate_checkpoint` does every part of one checkpoint not done
yet, round by round, writing one file a round and the resume metadata after each
(``score_sde.eval_records``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import numpy as np

import bound_likelihood
import likelihood
import sampling
import sde_lib
from score_sde import datasets, dequantizer_train, eval_checks, eval_records, inception, metrics, ode, parallel
from score_sde.train_checkpoints import eval_state_template
from score_sde.train_steps import device_keys, make_train_and_eval_steps


def eval_images(config, split: str) -> np.ndarray:
    """Every image of the ``'train'`` or ``'test'`` split of ``config.data``, undequantised, in canonical order.

    Read once through ``datasets.get_dataset`` (so every dataset's preprocessing applies) with
    one image per device: nothing is dropped on one device; with D devices the pipeline's
    ``drop_remainder`` can leave out up to D - 1 images (run on one device to avoid even that).
    Returns ``(N, H, W, C)``, uint8 for undequantised unresized data (see ``eval_records.collect_images``).
    """
    one_per_device = config.copy_and_resolve_references()
    one_per_device.eval.batch_size = parallel.device_count()
    train_ds, eval_ds, _ = datasets.get_dataset(one_per_device, additional_dim=None, uniform_dequantization=False,
                                                evaluation=True)
    images = eval_records.collect_images(train_ds if split == "train" else eval_ds)
    return eval_records.canonical_order(images)


def _host_rows(global_batch: np.ndarray, per_device: int) -> np.ndarray:
    """This host's part of a global batch, shaped ``(local_devices, per_device, ...)``."""
    local = parallel.local_device_count()
    start = parallel.process_index() * local * per_device
    rows = global_batch[start:start + local * per_device]
    return rows.reshape((local, per_device) + rows.shape[1:])


@dataclasses.dataclass
class EvalJob:
    """What ``run_lib.evaluate`` computes for every checkpoint, prepared once (:func:`build_job`).

    A part that is off (``eval.enable_*``) has its functions set to None.
    """

    config: Any
    eval_dir: str
    checkpoint_dir: str
    template: Any
    global_batch: int
    per_device: int
    scaler: Callable
    # eval loss
    p_eval_step: Callable | None = None
    loss_images: np.ndarray | None = None
    # bits/dim
    likelihood_fn: Callable | None = None
    bpd_dataset: str = "test"
    bpd_images: np.ndarray | None = None
    bpd_batches_per_repeat: int = 0
    num_bpd_rounds: int = 0
    # the likelihood bound, on the bits/dim batches
    bound_fn: Callable | None = None
    # eval.dequantizer: (keys, images in [0, 1]) -> (model inputs, bits/dim of log q(u | x)); None: uniform noise
    dequantizer: Callable | None = None
    # samples and IS / FID / KID
    sampling_fn: Callable | None = None
    num_sampling_rounds: int = 0
    extractor: Any = None
    stats_path: str | None = None
    data_stats: dict | None = None
    names: dict | None = None

    @property
    def host(self) -> int:
        return parallel.process_index()

    def save_meta(self, meta: eval_records.EvalMeta, **changes) -> eval_records.EvalMeta:
        return eval_records.update_eval_meta(self.eval_dir, self.host, meta, **changes)


def _images_for_batches(config, split: str, global_batch: int) -> np.ndarray:
    images = eval_images(config, split)
    if len(images) < global_batch:
        raise eval_checks.EvaluationError(f"The {split} split has {len(images)} images, fewer than one batch "
                                          f"(config.eval.batch_size = {global_batch}).")
    return images


def build_job(config, eval_dir: str, checkpoint_dir: str, model_rng: jax.Array, sample_metrics: dict | None):
    """Models, data and compiled functions of the parts ``config.eval.enable_*`` asks for.

    ``sample_metrics``: what :func:`load_sample_metric_inputs` returned (None when sampling is off).
    Reads the evaluation data: an ``eval_checks.EvaluationError`` when a split is smaller than one batch.
    """
    score_model, template = eval_state_template(config, model_rng)
    sde, sampling_eps = sde_lib.get_sde(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    global_batch = config.eval.batch_size
    job = EvalJob(config=config, eval_dir=eval_dir, checkpoint_dir=checkpoint_dir, template=template,
                  global_batch=global_batch, per_device=global_batch // parallel.device_count(),
                  scaler=datasets.get_data_scaler(config), bpd_dataset=config.eval.bpd_dataset.lower())
    if config.eval.enable_loss:
        job.p_eval_step = make_train_and_eval_steps(config, sde, score_model)[1]
        job.loss_images = _images_for_batches(config, "test", global_batch)
    if config.eval.enable_bpd:
        # The ODE solver and tolerances of config.sampling, as the samplers use them (ode.DEFAULT_SOLVER).
        job.likelihood_fn = likelihood.get_likelihood_fn(
            sde, score_model, inverse_scaler, rtol=config.sampling.get("ode_rtol", 1e-5),
            atol=config.sampling.get("ode_atol", 1e-5), solver=config.sampling.get("ode_solver", ode.DEFAULT_SOLVER))
    if config.eval.get("enable_bound", False):
        job.bound_fn = likelihood_bound_fn(config, sde, score_model, inverse_scaler)
    if job.likelihood_fn is not None or job.bound_fn is not None:
        if config.eval.get("dequantizer", False):
            job.dequantizer = dequantizer_train.load_eval_dequantizer(config, os.path.dirname(checkpoint_dir))
        job.bpd_images = _images_for_batches(config, job.bpd_dataset, global_batch)
        job.bpd_batches_per_repeat = len(job.bpd_images) // global_batch
        # The test split is gone over 5 times with fresh dequantisation noise, as the original.
        job.num_bpd_rounds = job.bpd_batches_per_repeat * (5 if job.bpd_dataset == "test" else 1)
    if config.eval.enable_sampling:
        sampling_shape = (global_batch // parallel.local_device_count(), config.data.image_size,
                          config.data.image_size, config.data.num_channels)
        job.sampling_fn = sampling.get_sampling_fn(config, sde, score_model, sampling_shape, inverse_scaler,
                                                   sampling_eps)
        job.num_sampling_rounds = -(-config.eval.num_samples // global_batch)
        job = dataclasses.replace(job, **sample_metrics)
    return job


def likelihood_bound_fn(config, sde, score_model, inverse_scaler) -> Callable:
    """score_flow's evaluation bound: importance-sampled time on VP / sub-VP (uniform on VE, which has none)."""
    return bound_likelihood.get_likelihood_bound_fn(
        sde, score_model, inverse_scaler, dsm=config.eval.get("dsm", True),
        eps=config.training.get("smallest_time", 1e-5), N=config.eval.get("bound_num_times", 1000),
        importance_weighting=hasattr(sde, "sample_importance_weighted_time_for_likelihood"),
        eps_offset=config.eval.get("offset", True))


def load_sample_metric_inputs(config, feature_extractor) -> dict:
    """The feature network, the dataset statistics and the metric names (fails before any long work)."""
    extractor = feature_extractor or inception.load_feature_extractor(config)
    stats_path = eval_records.dataset_stats_path(config)
    data_stats = eval_records.load_dataset_stats(stats_path)
    names = inception.metric_names(extractor.is_inception, int(np.shape(data_stats["pool_3"])[1]))
    return {"extractor": extractor, "stats_path": stats_path, "data_stats": data_stats, "names": names}


def _meta_key(meta: eval_records.EvalMeta) -> jax.Array:
    return jax.numpy.asarray(np.asarray(meta.rng, np.uint32))


def _eval_loss(job: EvalJob, ckpt: int, pstate, meta):
    """The loss of every full batch of the (canonically ordered) test split -> ``ckpt_<n>_loss.npz``."""
    config, rng = job.config, _meta_key(meta)
    all_losses = []
    for i in range(len(job.loss_images) // job.global_batch):
        batch = job.loss_images[i * job.global_batch:(i + 1) * job.global_batch]
        if config.data.uniform_dequantization:
            batch = eval_records.dequantize(batch, (config.seed, 0, i))
        else:
            batch = eval_records.to_unit_float(batch)
        batch = _host_rows(job.scaler(batch), job.per_device)[:, None]
        rng, keys = device_keys(rng)
        _, p_eval_loss = job.p_eval_step((keys, pstate), {"image": batch})
        all_losses.extend(parallel.unreplicate_to_host(p_eval_loss).reshape(-1))
    all_losses = np.asarray(all_losses)
    if parallel.is_main_process():
        eval_records.write_npz(os.path.join(job.eval_dir, f"ckpt_{ckpt}_loss.npz"), all_losses=all_losses,
                               mean_loss=all_losses.mean())
    logging.info("ckpt: %d, eval loss: %.6e", ckpt, all_losses.mean())
    return job.save_meta(meta, loss_done=True, rng=eval_records.key_to_list(rng))


def _bpd_batch(job: EvalJob, bpd_round: int) -> np.ndarray:
    """The dequantised, scaled images of bits/dim round ``bpd_round``: ``(local_devices, per_device, H, W, C)``.

    Repeat ``r`` of the split goes through it in the order of a permutation seeded by
    ``(seed, r)``, with dequantisation noise seeded by ``(seed, 1, r, batch)``.
    """
    seed = job.config.seed
    repeat, batch_id = divmod(bpd_round, job.bpd_batches_per_repeat)
    batch = eval_records.dequantize(_bpd_images(job, bpd_round), (seed, 1, repeat, batch_id))
    return _host_rows(job.scaler(batch), job.per_device)


def _bpd_images(job: EvalJob, bpd_round: int) -> np.ndarray:
    """The undequantised images of bits/dim round ``bpd_round`` (all hosts'), in the order of :func:`_bpd_batch`."""
    repeat, batch_id = divmod(bpd_round, job.bpd_batches_per_repeat)
    order = np.random.default_rng([job.config.seed, repeat]).permutation(len(job.bpd_images))
    return job.bpd_images[order[batch_id * job.global_batch:(batch_id + 1) * job.global_batch]]


def _bpd_data(job: EvalJob, bpd_round: int, keys: jax.Array) -> tuple[Any, Any]:
    """``(data, extra_bpd)``: the model inputs of round ``bpd_round`` and the bits/dim their dequantisation adds.

    Uniform noise adds 0; under ``eval.dequantizer`` the noise ``u ~ q(u | x)`` of the trained Flow++
    dequantiser (drawn from ``keys``) adds ``log2 q(u | x) / D`` per example, (local_devices · per_device,).
    """
    if job.dequantizer is None:
        return _bpd_batch(job, bpd_round), 0.0
    images = eval_records.to_unit_float(_bpd_images(job, bpd_round))
    return job.dequantizer(keys, _host_rows(images, job.per_device))


def _eval_bpd_rounds(job: EvalJob, ckpt: int, pstate, meta, kind: str):
    """The rounds not done yet of ``kind``: ``'bpd'`` (the ODE bits/dim, ``job.likelihood_fn``) or ``'bound'`` (the
    likelihood bound, ``job.bound_fn``), on the bits/dim batches, one file each:
    ``<bpd_dataset>_ckpt_<n>_<kind>_<round>.npz``. Progress is ``meta.<kind>_rounds_done``."""
    value_fn = {"bpd": job.likelihood_fn, "bound": job.bound_fn}[kind]
    done_field = f"{kind}_rounds_done"
    suffix = "" if parallel.process_count() == 1 else f"_host_{job.host}"
    for bpd_round in range(getattr(meta, done_field), job.num_bpd_rounds):
        rng, keys = device_keys(_meta_key(meta))
        data, extra_bpd = _bpd_data(job, bpd_round, keys)
        values = np.asarray(value_fn(keys, pstate, data)[0]).reshape(-1) + extra_bpd
        eval_records.write_npz(
            os.path.join(job.eval_dir, f"{job.bpd_dataset}_ckpt_{ckpt}_{kind}_{bpd_round}{suffix}.npz"), values)
        repeat, batch_id = divmod(bpd_round, job.bpd_batches_per_repeat)
        logging.info("ckpt: %d, repeat: %d, batch: %d, mean %s bpd: %.6f", ckpt, repeat, batch_id,
                     "ODE" if kind == "bpd" else kind, values.mean())
        meta = job.save_meta(meta, **{done_field: bpd_round + 1}, rng=eval_records.key_to_list(rng))
    return meta


def _sampling_rounds(job: EvalJob, ckpt: int, pstate, meta):
    """The sampling rounds not done yet: ``ckpt_<n>_host_<h>/samples_<r>.npz`` and ``statistics_<r>.npz``."""
    config = job.config
    sample_dir = os.path.join(job.eval_dir, f"ckpt_{ckpt}_host_{job.host}")
    os.makedirs(sample_dir, exist_ok=True)
    for r in range(meta.sampling_rounds_done, job.num_sampling_rounds):
        logging.info("sampling -- ckpt: %d, round: %d of %d", ckpt, r + 1, job.num_sampling_rounds)
        rng, keys = device_keys(_meta_key(meta))
        samples, _ = job.sampling_fn(keys, pstate)
        samples = np.clip(np.asarray(samples) * 255.0, 0, 255).astype(np.uint8)
        samples = samples.reshape((-1, config.data.image_size, config.data.image_size, config.data.num_channels))
        eval_records.write_npz(os.path.join(sample_dir, f"samples_{r}.npz"), samples=samples)
        latents = inception.run_inception(samples, job.extractor)
        stats = {"pool_3": latents["pool_3"]}
        if latents["logits"] is not None:
            stats["logits"] = latents["logits"]
        eval_records.write_npz(os.path.join(sample_dir, f"statistics_{r}.npz"), **stats)
        meta = job.save_meta(meta, sampling_rounds_done=r + 1, rng=eval_records.key_to_list(rng))
    return meta


def _sample_metrics(job: EvalJob, ckpt: int) -> None:
    """IS / FID / KID of the first ``eval.num_samples`` samples of all hosts -> ``report_<n>.npz`` (process 0)."""
    num_samples = job.config.eval.num_samples
    pools, logits = [], []
    for h in range(parallel.process_count()):
        host_dir = os.path.join(job.eval_dir, f"ckpt_{ckpt}_host_{h}")
        files = [os.path.join(host_dir, f"statistics_{r}.npz") for r in range(job.num_sampling_rounds)]
        eval_checks.wait_for_host_files(files, f"the sample statistics of host {h}")
        for f in files:
            stat = eval_records.read_npz(f)
            pools.append(stat["pool_3"])
            if "logits" in stat:
                logits.append(stat["logits"])
    all_pools = np.concatenate(pools)[:num_samples]
    all_logits = np.concatenate(logits)[:num_samples] if logits else None
    eval_records.check_stats_extractor(job.data_stats, job.extractor, job.stats_path, all_pools.shape[1])
    scores = metrics.compute_metrics(all_pools, all_logits, job.data_stats["pool_3"])
    inception_score = scores["IS"] if all_logits is not None else -1.0
    names = job.names
    logging.info("ckpt-%d --- %s: %.6e, %s: %.6e, %s: %.6e", ckpt, names["IS"], inception_score,
                 names["fid"], scores["fid"], names["kid"], scores["kid"])
    eval_records.write_npz(os.path.join(job.eval_dir, f"report_{ckpt}.npz"), IS=inception_score, fid=scores["fid"],
                           kid=scores["kid"], num_samples=len(all_pools),
                           feature_extractor=np.asarray(job.extractor.name))


def evaluate_checkpoint(job: EvalJob, ckpt: int, meta):
    """Every part not done yet for checkpoint ``ckpt`` (the meta says what is); returns the updated meta."""
    state = eval_checks.wait_and_restore(job.checkpoint_dir, ckpt, job.template, eval_checks.wait_seconds(job.config))
    pstate = parallel.replicate(state)
    if job.p_eval_step is not None and not meta.loss_done:
        meta = _eval_loss(job, ckpt, pstate, meta)
    if job.likelihood_fn is not None:
        meta = _eval_bpd_rounds(job, ckpt, pstate, meta, "bpd")
    if job.bound_fn is not None:
        meta = _eval_bpd_rounds(job, ckpt, pstate, meta, "bound")
    if job.sampling_fn is not None:
        meta = _sampling_rounds(job, ckpt, pstate, meta)
        if not meta.metrics_done:
            if parallel.is_main_process():
                _sample_metrics(job, ckpt)
            else:
                eval_checks.wait_for_host_files([os.path.join(job.eval_dir, f"report_{ckpt}.npz")],
                                                "the metrics of process 0")
            meta = job.save_meta(meta, metrics_done=True)
    return meta
