"""Model registry and helpers on flattened parameter vectors."""

from flsec.models.registry import MODELS, InputSpec, build_model, check_fits, has_width, output_layer_slice

# Import the built-in families so they register themselves.
from flsec.models import cnn as _cnn  # noqa: F401  isort: skip
from flsec.models import resnet as _resnet  # noqa: F401  isort: skip

__all__ = ["MODELS", "InputSpec", "build_model", "check_fits", "has_width", "output_layer_slice"]
