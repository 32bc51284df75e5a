"""The fleet spec: models, loading with positions, and cross-reference checks."""

from controller.spec.load import LoadedSpec, load_spec
from controller.spec.models import Fleet, Host, Model

__all__ = ["Fleet", "Host", "LoadedSpec", "Model", "load_spec"]
