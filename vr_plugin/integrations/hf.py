"""The old home of :mod:`vr_plugin.training` (the core HF-native training path is no host integration); this
module keeps ``from vr_plugin.integrations.hf import ...`` working for the names it always exported."""

from ..training import *  # noqa: F403
from ..training import __all__  # noqa: F401
