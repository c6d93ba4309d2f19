"""MI estimators as named plug-ins (see base.py). Importing this package registers the
built-in ones; a new estimator is one new module here plus its line below."""

from models.estimators import answer_gain as _answer_gain  # noqa: F401  (registers)
from models.estimators import hsic as _hsic  # noqa: F401  (registers)
from models.estimators import rollout as _rollout  # noqa: F401  (registers)
from models.estimators.base import (
    REGISTRY,
    ChildTrace,
    Estimator,
    EstimatorChunk,
    TraceData,
    get_estimator,
    parse_params,
)

__all__ = ["REGISTRY", "ChildTrace", "Estimator", "EstimatorChunk", "TraceData", "get_estimator",
           "parse_params"]
