"""Score-model architectures. Importing this package registers every model with
:func:`models.utils.register_model`, so ``get_model(config.model.name)`` finds it."""
