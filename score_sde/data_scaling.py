"""The data scalers, without TensorFlow (``--mode sample`` needs them and nothing else of ``datasets``).

``score_sde.datasets.get_data_scaler`` / ``get_data_inverse_scaler`` are these functions.
"""
from __future__ import annotations

from typing import Any, Callable


def get_data_scaler(config) -> Callable[[Any], Any]:
    """Map data in ``[0, 1]`` to the model's range: ``[-1, 1]`` when ``config.data.centered``, else unchanged."""
    if config.data.centered:
        return lambda x: x * 2.0 - 1.0
    return lambda x: x


def get_data_inverse_scaler(config) -> Callable[[Any], Any]:
    """Inverse of :func:`get_data_scaler`: model range back to ``[0, 1]``."""
    if config.data.centered:
        return lambda x: (x + 1.0) / 2.0
    return lambda x: x
