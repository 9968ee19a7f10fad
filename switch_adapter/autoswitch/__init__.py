"""Auto-Switch: route every input to a composition of T-Switch adapters by nearest-neighbour retrieval."""

from .bundle import BundleError
from .compose import CacheInfo
from .config import AutoSwitchConfig
from .features import EmptyQuerySetError, FeatureMismatchError, FeatureSpec, QueryFeatures
from .model import AutoSwitchModel, DuplicateTaskError
from .routing import Group, RoutingResult
from .sources import AdapterMismatchError

__all__ = [
    "AdapterMismatchError",
    "AutoSwitchConfig",
    "AutoSwitchModel",
    "BundleError",
    "CacheInfo",
    "DuplicateTaskError",
    "EmptyQuerySetError",
    "FeatureMismatchError",
    "FeatureSpec",
    "Group",
    "QueryFeatures",
    "RoutingResult",
]
