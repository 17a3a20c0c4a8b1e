"""Read checkpoints written by the original score_sde code into our :class:`models.utils.State`.

The original saved its ``State`` with ``flax.training.checkpoints.save_checkpoint`` (flax
msgpack). Restored without a target, such a file is a nested dict::

    {'step', 'lr', 'model_state', 'ema_rate', 'params_ema', 'rng',
     'optimizer': {'target': params,
                   'state': {'step', 'param_states': params tree with
                             {'grad_ema', 'grad_sq_ema'} at every leaf}}}

(``flax.optim.Adam``). score_flow's checkpoints have the same layout: its score models exactly, its
Flow++ dequantiser (``DeqState``) without ``model_state`` and with two logged running bits/dim,
which are not carried (our dequantiser state is a ``State`` with an empty ``model_state``). Our state keeps the parameters in ``params`` and optax's Adam
moments in ``opt_state``; :func:`state_from_legacy` carries everything over, values
unchanged, so that evaluation and sampling use the original ``params_ema`` and training
resumes with the original Adam moments and step.

The released checkpoints were written with flax 0.3.1, whose ``GroupNorm`` stored ``scale``
and ``bias`` with shape ``(1, 1, 1, C)``; today's flax uses ``(C,)``. That one difference is
reshaped away; any other shape or structure mismatch is an error that names the parameter.

Only msgpack data is read (via :mod:`flax.serialization`); nothing is ever unpickled.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from models.utils import State

# Keys every original state has. score_sde's ``State`` adds ``model_state``; score_flow's dequantiser state
# (``DeqState``) has none but adds the running bits/dim ``ema_train_bpd`` / ``ema_eval_bpd`` (logging only).
_LEGACY_KEYS = frozenset({"step", "optimizer", "lr", "ema_rate", "params_ema", "rng"})


def is_legacy_state_dict(raw: Any) -> bool:
    """Whether ``raw`` (a checkpoint restored without a target) has the original's layout.

    The original's state has an ``optimizer`` entry holding ``target`` (the parameters) and
    ``state``; ours has ``params`` and ``opt_state`` instead.
    """
    if not isinstance(raw, Mapping):
        return False
    optimizer = raw.get("optimizer")
    return (_LEGACY_KEYS.issubset(raw.keys()) and "params" not in raw and isinstance(optimizer, Mapping)
            and "target" in optimizer and "state" in optimizer)


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _convert_tree(legacy: Mapping, template: Any, what: str) -> Any:
    """``legacy`` (nested dict of arrays) laid out and shaped like ``template`` (nested dict).

    Leaves are cast to the template leaf's dtype. A legacy leaf of shape ``(1, 1, 1, C)``
    whose template leaf has shape ``(C,)`` is reshaped (flax 0.3.1 GroupNorm); every other
    difference raises ``ValueError`` naming the parameter path and both shapes.
    """
    flat_legacy = traverse_util.flatten_dict(dict(legacy), keep_empty_nodes=False)
    flat_template = traverse_util.flatten_dict(dict(template), keep_empty_nodes=False)
    missing = sorted(_path_str(p) for p in flat_template.keys() - flat_legacy.keys())
    unexpected = sorted(_path_str(p) for p in flat_legacy.keys() - flat_template.keys())
    if missing or unexpected:
        raise ValueError(
            f"The original checkpoint's {what} do not match the model built from the config: "
            f"missing in the checkpoint: {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
            f"not in the model: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}. "
            "Use the config the checkpoint was trained with (config.model.*).")
    converted = {}
    for path, template_leaf in flat_template.items():
        value = np.asarray(flat_legacy[path])
        want = tuple(np.shape(template_leaf))
        if value.shape != want:
            is_groupnorm_legacy = (len(want) == 1 and value.shape == (1, 1, 1, want[0]))
            if not is_groupnorm_legacy:
                raise ValueError(
                    f"Parameter {_path_str(path)!r} in the original checkpoint's {what} has shape {value.shape}, "
                    f"but the model built from the config expects {want}. Only the flax 0.3.1 GroupNorm layout "
                    "(1, 1, 1, C) -> (C,) is converted; check config.model.* against the checkpoint's config.")
            value = value.reshape(want)
        converted[path] = jnp.asarray(value, dtype=jnp.asarray(template_leaf).dtype)
    return traverse_util.unflatten_dict(converted)


def _split_moments(param_states: Mapping) -> tuple[dict, dict]:
    """Split flax.optim.Adam's per-leaf ``{'grad_ema', 'grad_sq_ema'}`` into two parameter trees."""
    flat = traverse_util.flatten_dict(dict(param_states), keep_empty_nodes=False)
    mu, nu = {}, {}
    for path, value in flat.items():
        *leaf_path, field = path
        if field == "grad_ema":
            mu[tuple(leaf_path)] = value
        elif field == "grad_sq_ema":
            nu[tuple(leaf_path)] = value
        else:
            raise ValueError(f"Unexpected entry {_path_str(path)!r} in the original checkpoint's Adam state "
                             "(expected 'grad_ema' / 'grad_sq_ema' at every parameter).")
    return traverse_util.unflatten_dict(mu), traverse_util.unflatten_dict(nu)


def _fill_opt_state(node: Any, mu: Any, nu: Any, count: int, found: list) -> Any:
    """Copy of the optax state ``node`` with the Adam moments and step counts of the original.

    Every ``optax.ScaleByAdamState`` gets ``mu``/``nu``/``count``; every other state with a
    scalar ``count`` (schedules, injected hyper-parameters) gets ``count`` too, since all of
    them count optimizer updates, as the original's ``optimizer.state.step`` did.
    """
    if isinstance(node, optax.ScaleByAdamState):
        found.append(node)
        return node._replace(count=jnp.asarray(count, dtype=jnp.asarray(node.count).dtype),
                             mu=_convert_tree(mu, node.mu, "Adam first moments (grad_ema)"),
                             nu=_convert_tree(nu, node.nu, "Adam second moments (grad_sq_ema)"))
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # a NamedTuple optax state
        fields = {name: _fill_opt_state(getattr(node, name), mu, nu, count, found) for name in node._fields}
        if "count" in fields and np.ndim(node.count) == 0:
            fields["count"] = jnp.asarray(count, dtype=jnp.asarray(node.count).dtype)
        return type(node)(**fields)
    if isinstance(node, (tuple, list)):
        return type(node)(_fill_opt_state(child, mu, nu, count, found) for child in node)
    if isinstance(node, Mapping):
        return {key: _fill_opt_state(child, mu, nu, count, found) for key, child in node.items()}
    return node


def _like(value: Any, template: Any) -> Any:
    """A scalar from the checkpoint in the Python / array type of the template's field."""
    if isinstance(template, bool):
        return bool(value)
    if isinstance(template, int):
        return int(value)
    if isinstance(template, float):
        return float(value)
    return jnp.asarray(value, dtype=jnp.asarray(template).dtype)


def _convert_rng(value: Any, template: Any) -> jax.Array:
    """The original's raw ``uint32[2]`` key, as a typed key if the template uses typed keys."""
    data = jnp.asarray(np.asarray(value, dtype=np.uint32))
    if jnp.issubdtype(jnp.asarray(template).dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(template))
    return data


def state_from_legacy(raw: Mapping, template: State) -> State:
    """Convert a checkpoint dict in the original's layout into a :class:`State` shaped like ``template``.

    Args:
        raw: the checkpoint restored without a target (``flax.serialization.msgpack_restore``
            of the file, or ``flax.training.checkpoints.restore_checkpoint(..., target=None)``);
            see :func:`is_legacy_state_dict`.
        template: a freshly initialised state for the same config (``losses.init_train_state``);
            its tree structure, shapes, dtypes and optimizer state layout are kept.

    Returns:
        ``template`` with every value taken from the checkpoint: ``step``, ``params``
        (``optimizer.target``), the Adam moments and count in ``opt_state``, ``lr``,
        ``model_state``, ``ema_rate``, ``params_ema`` and ``rng``.

    Raises:
        ValueError: the dict is not in the original layout, a parameter is missing, extra,
            or has a shape other than the model's (beyond the GroupNorm layout), or the
            template's optimizer has no Adam state to receive the moments.
    """
    if not is_legacy_state_dict(raw):
        keys = sorted(raw.keys()) if isinstance(raw, Mapping) else type(raw).__name__
        raise ValueError(f"Not a checkpoint of the original score_sde code (expected keys {sorted(_LEGACY_KEYS)}, "
                         f"got {keys}).")
    optimizer = raw["optimizer"]
    params = _convert_tree(optimizer["target"], template.params, "parameters (optimizer/target)")
    params_ema = _convert_tree(raw["params_ema"], template.params_ema, "EMA parameters (params_ema)")
    model_state = _convert_tree(raw.get("model_state") or {}, template.model_state or {}, "model_state")
    mu, nu = _split_moments(optimizer["state"]["param_states"])
    found: list = []
    opt_state = _fill_opt_state(template.opt_state, mu, nu, int(np.asarray(optimizer["state"]["step"])), found)
    if len(found) != 1:
        raise ValueError(f"The optimizer state built from config.optim holds {len(found)} Adam states "
                         "(optax.ScaleByAdamState); exactly one is needed to carry over the original "
                         "checkpoint's flax.optim.Adam moments. Use config.optim.optimizer='Adam'.")
    return template.replace(
        step=_like(np.asarray(raw["step"]), template.step),
        params=params,
        opt_state=opt_state,
        lr=_like(np.asarray(raw["lr"]), template.lr),
        model_state=model_state,
        ema_rate=_like(np.asarray(raw["ema_rate"]), template.ema_rate),
        params_ema=params_ema,
        rng=_convert_rng(raw["rng"], template.rng),
    )
