"""Directions in parameter space for loss-landscape plots.

Directions are ``dict[str, Tensor]`` keyed like ``model.named_parameters()`` (the chosen
parameters only, see ``params``). Random directions are filter-normalized by default
(Li et al., 2018, arXiv 1712.09913, §4): for each filter j of each weight tensor
(an output channel of a conv, a row of a linear layer),

    d_j ← d_j · ‖θ_j‖ / ‖d_j‖,

and 1-D tensors (biases, BatchNorm parameters) get d = 0. Other directions: Hessian
eigenvectors and the top principal components of a training trajectory (Li et al. §7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from flatness._utils.validate import check_seed
from flatness.objective import parameter_backend
from flatness.objective._params import ParamLayout, ParamSpec, select_params, unwrap
from flatness.results import Result

__all__ = [
    "TrajectoryPCA",
    "eigen_directions",
    "normalize_direction",
    "pca_directions",
    "random_direction",
]

Normalization = Literal["filter", "layer"] | None
_EPS = 1e-10  # as in Li et al.'s code: keeps an all-zero direction zero


def _check_normalization(normalization: Any) -> None:
    if not (
        normalization is None or (isinstance(normalization, str) and normalization in ("filter", "layer"))
    ):
        raise ValueError(f"normalization: got {normalization!r}; expected 'filter', 'layer' or None")


def _check_seed(seed: Any) -> int:
    """``seed`` as a Python int in [0, 2**63 − 1] (the library's one seed rule)."""
    return check_seed(seed)


def _named(model: nn.Module, params: ParamSpec) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return [(n, p.detach()) for n, p in select_params(unwrap(model), params)]


def _normalize_tensor(
    d: torch.Tensor,
    w: torch.Tensor,
    normalization: Normalization,
    ignore_1d: bool,
    norm: Callable[[torch.Tensor], Any] | None = None,
) -> torch.Tensor:
    """One tensor's piece of :func:`normalize_direction`; ``norm`` is a whole tensor's norm.

    Filters (first-axis slices) are whole in every piece; a whole-tensor norm (``"layer"``,
    kept 1-D tensors) of a tensor split over processes needs ``norm`` summed over them.
    """
    whole = norm if norm is not None else torch.linalg.vector_norm
    if d.ndim <= 1:
        if ignore_1d:
            return torch.zeros_like(d)
        if normalization is None:
            return d
        # Our choice for 1-D tensors kept in: one "filter" = the whole tensor.
        return d * (whole(w) / (whole(d) + _EPS))
    if normalization == "filter":
        dims = tuple(range(1, d.ndim))
        wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
        return d * (wn / (torch.linalg.vector_norm(d, dim=dims, keepdim=True) + _EPS))
    if normalization == "layer":
        return d * (whole(w) / (whole(d) + _EPS))
    return d


def normalize_parts(
    direction: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    *,
    normalization: Normalization,
    ignore_1d: bool,
    norm: Callable[[torch.Tensor], Any] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`normalize_direction` of parameter pieces (e.g. one rank's shards), given θ's pieces.

    ``norm(t)`` is the norm of a whole tensor from its piece ``t`` (the norm summed over every
    process holding a piece; default: the piece's own norm, for whole tensors).
    """
    _check_normalization(normalization)
    return {n: _normalize_tensor(d, weights[n], normalization, ignore_1d, norm) for n, d in direction.items()}


def normalize_direction(
    direction: Mapping[str, torch.Tensor],
    model: nn.Module,
    *,
    normalization: Normalization = "filter",
    ignore_1d: bool = True,
    params: ParamSpec = None,
) -> dict[str, torch.Tensor]:
    """Rescale a direction filter by filter (or layer by layer) to the model's weights.

    .. math::
        d_j \\leftarrow d_j \\, \\frac{\\lVert \\theta_j \\rVert}{\\lVert d_j \\rVert}

    for every filter j (first-axis slice of a tensor with ≥ 2 dims; ``"layer"``: the whole
    tensor). Li, Xu, Taylor, Studer, Goldstein, 2018, "Visualizing the Loss Landscape of
    Neural Nets", arXiv 1712.09913, §4.

    Args:
        direction: ``{name: tensor}`` with the names and shapes of the chosen parameters.
        model: the model whose weights θ set the scale.
        normalization: ``"filter"``, ``"layer"`` or ``None`` (no rescaling).
        ignore_1d: set the direction of 1-D (and 0-D) tensors — biases, BatchNorm — to 0;
            when False they are rescaled as one whole tensor.
        params: which parameters form θ (as in :class:`flatness.Objective`).

    Returns:
        A new ``{name: tensor}`` on the parameters' devices and dtypes.

    Raises:
        ValueError: keys or shapes that do not match the parameters, unknown normalization.
        TypeError: a direction that is not a dict of tensors.
    """
    _check_normalization(normalization)
    named = _named(model, params)
    checked = _check_direction(direction, named, "direction")
    return {n: _normalize_tensor(checked[n], w, normalization, ignore_1d) for n, w in named}


def _check_direction(
    direction: Any, named: list[tuple[str, torch.Tensor]], what: str
) -> dict[str, torch.Tensor]:
    if not isinstance(direction, Mapping):
        raise TypeError(f"{what}: expected a dict name -> tensor, got {type(direction).__name__}")
    names = [n for n, _ in named]
    missing = [n for n in names if n not in direction]
    extra = [k for k in direction if k not in set(names)]
    if missing or extra:
        raise ValueError(
            f"{what}: keys do not match the parameters: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    out = {}
    for n, w in named:
        d = torch.as_tensor(direction[n])
        if d.shape != w.shape:
            raise ValueError(f"{what}: {n!r} has shape {tuple(d.shape)}; expected {tuple(w.shape)}")
        out[n] = d.detach().to(device=w.device, dtype=w.dtype)
    return out


def random_direction(
    model: nn.Module,
    *,
    normalization: Normalization = "filter",
    ignore_1d: bool = True,
    seed: int = 0,
    params: ParamSpec = None,
) -> dict[str, torch.Tensor]:
    """A seeded Gaussian direction d ~ N(0, I), filter-normalized by default.

    .. math::
        d \\sim \\mathcal N(0, I), \\qquad
        d_j \\leftarrow d_j \\, \\lVert \\theta_j \\rVert / \\lVert d_j \\rVert

    Li, Xu, Taylor, Studer, Goldstein, 2018, arXiv 1712.09913, §4. The draws come from a
    local ``torch.Generator`` (CPU, then moved), so the global random state is untouched
    and the same seed gives the same direction on any device. Every tensor is drawn, also
    those that are then zeroed, so ``ignore_1d`` does not change the other tensors.

    Args:
        model: the model (its parameters set shapes and, when normalizing, the scale).
        normalization: ``"filter"`` (Li et al.), ``"layer"`` (whole tensors) or ``None``.
        ignore_1d: zero direction for 1-D tensors (biases, BatchNorm), as in the paper.
        seed: seed of the local generator.
        params: which parameters form θ (as in :class:`flatness.Objective`).

    Returns:
        ``{name: tensor}`` keyed like ``model.named_parameters()``.

    Raises:
        ValueError: unknown normalization. TypeError: a seed that is not an int.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> d = flatness.random_direction(model, seed=1)
        >>> {name: tuple(t.shape) for name, t in d.items()}
        {'weight': (1, 3), 'bias': (1,)}
        >>> bool(torch.isclose(d["weight"].norm(), model.weight.norm())), d["bias"].abs().max().item()
        (True, 0.0)
    """
    _check_normalization(normalization)
    g = torch.Generator().manual_seed(check_seed(seed))
    space = parameter_backend(model, params)
    if space is not None:
        # This process's parts of θ (e.g. an FSDP model's shards): drawn by the vector space
        # (the same direction for any number of ranks), normalized with norms over every rank.
        return normalize_parts(
            space.unflatten(space.space.randn(g)),
            space.unflatten(space.theta0),
            normalization=normalization,
            ignore_1d=ignore_1d,
            norm=lambda t: space.space.norm64(t.reshape(-1)),
        )
    named = _named(model, params)
    out = {}
    for n, w in named:
        d = torch.randn(w.shape, generator=g, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
        out[n] = _normalize_tensor(d, w, normalization, ignore_1d)
    return out


def _flat_names(model: nn.Module, params: ParamSpec) -> tuple[list[tuple[str, torch.Tensor]], int]:
    named = _named(model, params)
    return named, sum(w.numel() for _, w in named)


def _unflatten(v: torch.Tensor, named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A flat vector as tensors shaped, typed and placed like the parameters ``named``."""
    pieces = ParamLayout.of(named).unflatten(v)
    return {n: pieces[n].to(device=w.device, dtype=w.dtype) for n, w in named}


def eigen_directions(
    model: nn.Module, eigenvectors: Any, *, params: ParamSpec = None
) -> list[dict[str, torch.Tensor]]:
    """Hessian eigenvectors as parameter-shaped directions.

    Accepts a ``(k, n)`` tensor / array (rows are vectors, e.g. ``hessian_topk(...).eigenvectors``),
    one flat ``(n,)`` vector, a list of flat vectors or dicts, or any object with an
    ``eigenvectors`` attribute. Use them with ``normalization=None`` to slice along the
    exact eigenvectors.

    Args:
        model: the model; the flat order is ``named_parameters()`` of the chosen parameters.
        eigenvectors: the vectors, as above.
        params: which parameters form θ (as in :class:`flatness.Objective`).

    Returns:
        A list of ``{name: tensor}``, one per vector.

    Raises:
        ValueError: vectors of the wrong length, dicts with wrong keys or shapes, none given.
        TypeError: anything else.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> top = flatness.hessian_topk(model, loss_fn, data, k=2)
        >>> dirs = flatness.eigen_directions(model, top)
        >>> len(dirs), {name: tuple(t.shape) for name, t in dirs[0].items()}
        (2, {'weight': (1, 3), 'bias': (1,)})
    """
    space = parameter_backend(model, params)
    whole = space is None
    named, n = _flat_names(model, params)
    if not whole:  # local vectors: this process's parts (e.g. hessian_topk's on an FSDP model)
        n = space.n_local
    if hasattr(eigenvectors, "eigenvectors") and not isinstance(eigenvectors, (torch.Tensor, np.ndarray)):
        eigenvectors = eigenvectors.eigenvectors
    if isinstance(eigenvectors, np.ndarray):
        eigenvectors = torch.from_numpy(eigenvectors)
    if isinstance(eigenvectors, Mapping):
        eigenvectors = [eigenvectors]
    if isinstance(eigenvectors, torch.Tensor):
        if eigenvectors.ndim == 1:
            eigenvectors = eigenvectors[None]
        if eigenvectors.ndim != 2 or eigenvectors.shape[1] != n:
            raise ValueError(
                f"eigenvectors: got shape {tuple(eigenvectors.shape)}; expected (k, {n}) for this model"
            )
        eigenvectors = list(eigenvectors)
    if not isinstance(eigenvectors, Sequence) or isinstance(eigenvectors, str):
        raise TypeError(
            f"eigenvectors: expected a (k, n) tensor, a list or a dict; got {type(eigenvectors).__name__}"
        )
    if len(eigenvectors) == 0:
        raise ValueError("eigenvectors: got none; expected at least one vector")
    out = []
    for i, v in enumerate(eigenvectors):
        if isinstance(v, Mapping):
            if not whole:
                v = space.flatten(dict(v))
            else:
                out.append(_check_direction(v, named, f"eigenvectors[{i}]"))
                continue
        v = torch.as_tensor(v)
        if v.ndim != 1 or v.shape[0] != n:
            raise ValueError(f"eigenvectors[{i}]: got shape {tuple(v.shape)}; expected ({n},)")
        out.append(
            _unflatten(v.detach(), named) if whole else space.unflatten(space.as_vector(v, "eigenvectors"))
        )
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class TrajectoryPCA(Result):
    """Top principal components of a training trajectory, relative to the final model."""

    directions: list[dict[str, torch.Tensor]]
    explained_variance_ratio: np.ndarray
    coordinates: np.ndarray  # (checkpoints, components): (θ_i − θ_final) projected on the directions
    n_checkpoints: int


def _checkpoint_vector(ckpt: Any, named: list[tuple[str, torch.Tensor]], i: int) -> torch.Tensor:
    if isinstance(ckpt, nn.Module):
        ckpt = dict(unwrap(ckpt).named_parameters())
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"checkpoints[{i}]: expected a model or a state dict, got {type(ckpt).__name__}")
    state = {k.removeprefix("module."): v for k, v in ckpt.items()}
    pieces = []
    for n, w in named:
        if n not in state:
            raise ValueError(f"checkpoints[{i}]: no entry {n!r}; it has e.g. {list(state)[:5]}")
        t = torch.as_tensor(state[n]).detach()
        if t.shape != w.shape:
            raise ValueError(f"checkpoints[{i}]: {n!r} has shape {tuple(t.shape)}; expected {tuple(w.shape)}")
        pieces.append(t.reshape(-1).to(device="cpu", dtype=torch.float64))
    return torch.cat(pieces)


def pca_directions(
    model: nn.Module,
    checkpoints: Sequence[Any],
    *,
    n_components: int = 2,
    params: ParamSpec = None,
) -> TrajectoryPCA:
    """Top principal components of a trajectory of checkpoints, relative to the final model.

    .. math::
        M = [\\theta_0 - \\theta_n; \\ldots; \\theta_{n-1} - \\theta_n], \\qquad
        M - \\bar M = U S V^\\top, \\quad d_i = V_{:, i}

    Li, Xu, Taylor, Studer, Goldstein, 2018, arXiv 1712.09913, §7 (PCA centers the rows, as
    in their code with scikit-learn). Directions are unit vectors (use ``normalization=None``
    in the grids to keep the trajectory's scale). Signs: the largest-magnitude entry of each
    direction is positive. Computed in float64 on the CPU.

    Args:
        model: the final model θ_n.
        checkpoints: earlier models or state dicts θ_0..θ_{n-1} (at least ``n_components + 1``).
        n_components: how many directions.
        params: which parameters form θ (as in :class:`flatness.Objective`).

    Returns:
        :class:`TrajectoryPCA` with ``directions``, ``explained_variance_ratio`` and the
        checkpoints' ``coordinates`` along the directions (for plotting the path).

    Raises:
        ValueError: too few checkpoints, mismatched names or shapes. TypeError: bad types.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> checkpoints = []
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for _ in range(5):
        ...     checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
        ...     opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()
        >>> pca = flatness.pca_directions(model, checkpoints, n_components=2)
        >>> len(pca.directions), pca.coordinates.shape, bool(pca.explained_variance_ratio[0] > 0.9)
        (2, (5, 2), True)
    """
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components <= 0:
        raise ValueError(f"n_components: got {n_components!r}; expected a positive int")
    if parameter_backend(model, params) is not None:
        raise ValueError(
            "model: pca_directions needs whole parameter vectors in one process (an SVD of the "
            "checkpoints' differences), and this model's parameters are split over processes "
            "(fully_shard); compute it on full state dicts (e.g. torch.distributed.checkpoint's "
            "get_model_state_dict with full_state_dict=True) loaded into an unsharded copy"
        )
    named, n = _flat_names(model, params)
    if n_components > n:
        raise ValueError(f"n_components: got {n_components}; the model has only n = {n} parameters in θ")
    if not isinstance(checkpoints, Sequence) or isinstance(checkpoints, (str, bytes)):
        raise TypeError(
            f"checkpoints: expected a list of models or state dicts, got {type(checkpoints).__name__}"
        )
    if len(checkpoints) < n_components + 1:
        raise ValueError(
            f"checkpoints, n_components: got {len(checkpoints)} checkpoints; n_components="
            f"{n_components} needs at least {n_components + 1} (pass more checkpoints or fewer components)"
        )
    final = torch.cat([w.reshape(-1).to(device="cpu", dtype=torch.float64) for _, w in named])
    m = torch.stack([_checkpoint_vector(c, named, i) - final for i, c in enumerate(checkpoints)])
    _, s, vh = torch.linalg.svd(m - m.mean(0), full_matrices=False)
    vh = vh[:n_components]
    signs = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
    vh = vh * torch.where(signs == 0, 1.0, signs)
    var = s**2
    ratio = (var[:n_components] / var.sum()).numpy() if var.sum() > 0 else np.zeros(n_components)
    return TrajectoryPCA(
        directions=[_unflatten(v, named) for v in vh],
        explained_variance_ratio=ratio,
        coordinates=(m @ vh.T).numpy(),
        n_checkpoints=len(checkpoints),
    )
