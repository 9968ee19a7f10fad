"""Auto-Switch: route every input to a composition of T-Switch adapters by nearest-neighbour retrieval, in a
metric learned from the query sets (Auto-FlexSwitch) or a plain one."""

from .bundle import BundleError
from .compose import CacheInfo
from .config import AutoSwitchConfig
from .features import EmptyQuerySetError, FeatureMismatchError, FeatureSpec, QueryFeatures
from .inputs import InputMismatchError
from .metric import LearnedMetric, MetricFitError
from .model import AutoSwitchModel, DuplicateTaskError
from .routing import Group, RoutingResult
from .selection import FeatureChoice
from .sources import AdapterMismatchError

__all__ = [
    "AdapterMismatchError",
    "AutoSwitchConfig",
    "AutoSwitchModel",
    "BundleError",
    "CacheInfo",
    "DuplicateTaskError",
    "EmptyQuerySetError",
    "FeatureChoice",
    "FeatureMismatchError",
    "FeatureSpec",
    "Group",
    "InputMismatchError",
    "LearnedMetric",
    "MetricFitError",
    "QueryFeatures",
    "RoutingResult",
]
