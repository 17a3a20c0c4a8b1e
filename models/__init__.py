"""Score-model architectures. Importing this package registers every model with
:func:`models.utils.register_model`, so ``get_model(config.model.name)`` finds it."""
from models import ddpm, ncsnpp  # noqa: F401
from models import ncsnv2, wideresnet_noise_conditional  # noqa: F401
from models import mlp  # noqa: F401
