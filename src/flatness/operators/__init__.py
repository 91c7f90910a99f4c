"""Curvature matrices of a model's full-data loss as linear operators.

Each operator is a symmetric n×n matrix at the model's parameters θ₀, over the whole dataset
with the size-weighted semantics of :class:`flatness.Objective`, available through products:

- :class:`HessianOperator` — H = ∇²L(θ₀);
- :class:`GGNOperator` — the generalized Gauss–Newton matrix Jᵀ H_ℓ J;
- :class:`FisherOperator` — the Fisher of the predictive distribution, exact or Monte-Carlo;
- :class:`EmpiricalFisherOperator` — (1/N) Σᵢ gᵢ gᵢᵀ from per-sample gradients.

``op.block(params)`` restricts any of them to a parameter block (its diagonal block).
:func:`curvature_operator` builds one by name; every algorithm of :mod:`flatness.algorithms`
accepts them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from flatness._utils.validate import check_choice
from flatness.objective import Objective
from flatness.operators._base import CurvatureOperator
from flatness.operators.empirical_fisher import EmpiricalFisherOperator
from flatness.operators.fisher import FisherOperator
from flatness.operators.ggn import GGNOperator
from flatness.operators.hessian import HessianOperator

__all__ = [
    "CURVATURES",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "curvature_operator",
    "curvatures",
    "operator_class",
    "register_curvature",
]

_CLASSES: dict[str, type[CurvatureOperator]] = {
    cls.name: cls for cls in (HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator)
}
#: the built-in curvatures (:func:`curvatures` also lists the registered ones).
CURVATURES = tuple(_CLASSES)


def curvatures() -> tuple[str, ...]:
    """Every ``curvature=`` name: the built-in ones and those of :func:`register_curvature`."""
    return tuple(_CLASSES)


def register_curvature(cls: type[CurvatureOperator]) -> type[CurvatureOperator]:
    """Make ``cls`` available as ``curvature=cls.name`` wherever ``curvature=`` is taken.

    Usable as a class decorator. ``cls`` subclasses :class:`CurvatureOperator` and defines
    :meth:`CurvatureOperator.batch_product` (one batch's product); its keyword options are
    listed in ``own_options``. See docs/operators.md, "A new curvature".

    Raises:
        TypeError: ``cls`` is not a CurvatureOperator subclass.
        ValueError: its ``name`` is empty or already names another curvature.
    """
    if not (isinstance(cls, type) and issubclass(cls, CurvatureOperator)):
        raise TypeError(f"cls: expected a subclass of flatness.CurvatureOperator, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"cls: {cls.__name__}.name must be a non-empty str (its curvature= name), got {name!r}"
        )
    if _CLASSES.get(name, cls) is not cls:
        raise ValueError(f"cls: curvature {name!r} is already {_CLASSES[name].__name__}; choose another name")
    _CLASSES[name] = cls
    return cls


def operator_class(curvature: str) -> type[CurvatureOperator]:
    """The operator class of a ``curvature=`` name."""
    check_choice("curvature", curvature, curvatures())
    return _CLASSES[curvature]


def curvature_operator(
    model: nn.Module, loss_fn: Any = None, data: Any = None, *, curvature: str = "hessian", **options: Any
) -> CurvatureOperator:
    """The curvature matrix ``curvature`` of ``(model, loss_fn, data)`` at the model's parameters.

    Args:
        model: the network (any ``nn.Module``; see :class:`flatness.Objective`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss (``None`` with ``batch_loss``).
        data: a DataLoader, a list of batches or one batch.
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        **options: the objective's options and the operator's own (``mc_samples``,
            ``likelihood``, ``mc_seed`` for the Fisher).

    Returns:
        A :class:`CurvatureOperator`: ``op @ v``, ``op.to_scipy()``, ``op.dense()``, ``op.block(params)``.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> op = flatness.curvature_operator(model, loss_fn, data, curvature="empirical_fisher")
        >>> type(op).__name__, op.shape, torch.allclose(op.dense(), op.dense().T)
        ('EmpiricalFisherOperator', (4, 4), True)
    """
    return operator_class(curvature)(model, loss_fn, data, **options)


def split_options(curvature: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the objective's options, the operator's own options) of a ``curvature=`` call."""
    cls = operator_class(curvature)
    own = {k: v for k, v in options.items() if k in cls.own_options}
    rest = {k: v for k, v in options.items() if k not in cls.own_options}
    foreign = [k for k in rest for c in _CLASSES.values() if k in c.own_options]
    if foreign:
        raise TypeError(
            f"{foreign[0]}: an option of another curvature; curvature={curvature!r} does not take it"
        )
    return rest, own


def build_operator(
    model: nn.Module, loss_fn: Any, data: Any, curvature: str, options: dict[str, Any]
) -> CurvatureOperator:
    """Objective and operator for a model-level function, options already split and checked."""
    rest, own = split_options(curvature, options)
    return operator_class(curvature).from_objective(Objective(model, loss_fn, data, **rest), **own)
