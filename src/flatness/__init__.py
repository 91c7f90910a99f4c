"""flatness: how sharp or flat is a trained network's loss minimum?"""

from flatness.landscape import (
    eigen_directions,
    interpolate,
    landscape_1d,
    landscape_2d,
    load_landscape,
    pca_directions,
    random_direction,
)
from flatness.monitor import Monitor
from flatness.objective._fd import NonSmoothWarning
from flatness.objective._objective import NonFiniteLossError, NoSecondDerivativeError, Objective
from flatness.operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    curvature_operator,
)
from flatness.sharpness import (
    AdaptiveSharpnessResult,
    AverageSharpnessResult,
    SharpnessResult,
    adaptive_sharpness,
    average_sharpness,
    sharpness,
)
from flatness.spectrum import (
    BlockSpectra,
    CurvatureDensity,
    CurvatureTopK,
    CurvatureTrace,
    by_block,
    density,
    hessian_density,
    hessian_topk,
    hessian_trace,
    hutchinson,
    hutchpp,
    lanczos_eigsh,
    slq_density,
    topk,
    trace,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveSharpnessResult",
    "AverageSharpnessResult",
    "BlockSpectra",
    "CurvatureDensity",
    "CurvatureOperator",
    "CurvatureTopK",
    "CurvatureTrace",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "Monitor",
    "NoSecondDerivativeError",
    "NonFiniteLossError",
    "NonSmoothWarning",
    "Objective",
    "SharpnessResult",
    "__version__",
    "adaptive_sharpness",
    "average_sharpness",
    "by_block",
    "curvature_operator",
    "density",
    "eigen_directions",
    "hessian_density",
    "hessian_topk",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "interpolate",
    "lanczos_eigsh",
    "landscape_1d",
    "landscape_2d",
    "load_landscape",
    "pca_directions",
    "random_direction",
    "sharpness",
    "slq_density",
    "topk",
    "trace",
]
