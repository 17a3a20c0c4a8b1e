"""Name → class tables filled by class decorators: score models, predictors, correctors.

One :class:`Registry` per kind; ``models.utils`` keeps the models (``config.model.name``),
``sampling`` the predictors and correctors (``config.sampling.predictor`` / ``corrector``).
"""
from __future__ import annotations

from typing import Optional


class Registry:
    """Classes registered under unique names.

    Args:
        kind: what is registered, for messages ('model', 'predictor', ...).
        config_field: the config field that names an entry, for messages ('config.model.name').
    """

    def __init__(self, kind: str, config_field: str):
        self.kind = kind
        self.config_field = config_field
        self._classes: dict[str, type] = {}

    def register(self, cls: Optional[type] = None, *, name: Optional[str] = None):
        """Class decorator registering ``cls`` under ``name`` (default: the class name).

        Usable bare (``@registry.register``) or with a name (``@registry.register(name='ddpm')``).
        """

        def _register(cls: type) -> type:
            local_name = cls.__name__ if name is None else name
            if local_name in self._classes:
                raise ValueError(f"A {self.kind} is already registered under the name {local_name!r}; "
                                 f"pass another name= to the decorator.")
            self._classes[local_name] = cls
            return cls

        return _register if cls is None else _register(cls)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def get(self, name: str) -> type:
        """The class registered as ``name``; a ValueError naming the config field and the choices otherwise."""
        if name not in self._classes:
            raise ValueError(f"Unknown {self.kind} {name!r} ({self.config_field}); choose one of {self.names()}.")
        return self._classes[name]

