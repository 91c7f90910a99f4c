"""Loss-landscape results: grids of losses that save to .npz, load back and resume."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from flatness.results import Result

__all__ = ["Interpolation", "Landscape1D", "Landscape2D", "LandscapeResult", "load_landscape"]

_FORMAT = 1


@dataclasses.dataclass(frozen=True, eq=False)
class LandscapeResult(Result):
    """Losses on a grid of points θ₀ + Σ_i c_i d_i (the answer), then the evidence.

    Attributes:
        loss: ``(len(alphas),)`` or ``(len(alphas), len(betas))`` float64 array; NaN where not
            (yet) evaluated or not finite.
        alphas, betas: the grid coordinates (``betas`` is None for 1-D grids).
        metrics: ``{name: array shaped like loss}``.
        directions: the directions used (parameter-shaped dicts); for interpolation the one
            direction θ_b − θ_a.
        center_loss: L at the centre (θ₀; for interpolation θ_a, α = 0).
        done: boolean array shaped like ``loss``: which points have been evaluated.
        n_points, n_evaluated, n_nonfinite, n_passes: grid size, points evaluated by this
            call (the rest came from ``resume_from``), non-finite values, data passes.
        vectorized: whether the points were evaluated with vmap (None when nothing ran).
        normalization, seed: the options the directions were made with.
    """

    loss: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray | None
    metrics: dict[str, np.ndarray]
    directions: list[dict[str, torch.Tensor]]
    center_loss: float
    done: np.ndarray
    n_points: int
    n_evaluated: int
    n_nonfinite: int
    n_passes: int
    vectorized: bool | None
    normalization: str | None
    seed: int | None
    kind: ClassVar[str] = "grid"

    @property
    def complete(self) -> bool:
        """True when every grid point has been evaluated."""
        return bool(self.done.all())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the result to ``path`` (.npz; written atomically, so a crash keeps the old file)."""
        arrays: dict[str, np.ndarray] = {
            "loss": self.loss,
            "alphas": self.alphas,
            "done": self.done,
        }
        if self.betas is not None:
            arrays["betas"] = self.betas
        for name, values in self.metrics.items():
            arrays[f"metric::{name}"] = values
        for i, d in enumerate(self.directions):
            for name, t in d.items():
                arrays[f"direction{i}::{name}"] = t.detach().cpu().numpy()
        meta = {
            "format": _FORMAT,
            "kind": self.kind,
            "metrics": list(self.metrics),
            "directions": [list(d) for d in self.directions],
            "center_loss": self.center_loss,
            "n_points": self.n_points,
            "n_evaluated": self.n_evaluated,
            "n_nonfinite": self.n_nonfinite,
            "n_passes": self.n_passes,
            "vectorized": self.vectorized,
            "normalization": self.normalization,
            "seed": self.seed,
        }
        arrays["meta"] = np.array(json.dumps(meta))
        path = Path(path)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LandscapeResult:
        """Read a result written by :meth:`save` (the subclass it was saved as)."""
        return load_landscape(path)


@dataclasses.dataclass(frozen=True, eq=False)
class Interpolation(LandscapeResult):
    """Loss along θ(α) = (1 − α) θ_a + α θ_b (Goodfellow et al. 2015; Keskar et al. 2017 Fig. 3)."""

    kind: ClassVar[str] = "interpolation"


@dataclasses.dataclass(frozen=True, eq=False)
class Landscape1D(LandscapeResult):
    """Loss along θ₀ + α d (Li et al. 2018)."""

    kind: ClassVar[str] = "1d"


@dataclasses.dataclass(frozen=True, eq=False)
class Landscape2D(LandscapeResult):
    """Loss on θ₀ + α d₁ + β d₂; ``loss[i, j]`` is at (alphas[i], betas[j]) (Li et al. 2018)."""

    kind: ClassVar[str] = "2d"


_KINDS = {c.kind: c for c in (Interpolation, Landscape1D, Landscape2D)}


def load_landscape(path: str | os.PathLike[str]) -> LandscapeResult:
    """Load a landscape result saved with ``result.save(path)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a flatness landscape result (naming ``path``).

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> import os, tempfile
        >>> line = flatness.landscape_1d(model, loss_fn, data, alphas=[-0.5, 0.0, 0.5])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     line.save(os.path.join(tmp, "line.npz"))
        ...     again = flatness.load_landscape(os.path.join(tmp, "line.npz"))
        >>> type(again).__name__, bool((again.loss == line.loss).all())
        ('Landscape1D', True)
    """
    try:
        return _load(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"path: no file {os.fspath(path)!r} ({e.strerror})") from e
    except (ValueError, KeyError, OSError, TypeError, zipfile.BadZipFile) as e:
        if isinstance(e, ValueError) and str(e).startswith("path: "):
            raise
        raise ValueError(
            f"path: {os.fspath(path)!r} is not a flatness landscape result written by result.save "
            f"({type(e).__name__}: {e})"
        ) from e


def _load(path: str | os.PathLike[str]) -> LandscapeResult:
    with np.load(path, allow_pickle=False) as z:
        if not hasattr(z, "files"):
            raise ValueError(f"path: {os.fspath(path)!r} is a single array, not a flatness landscape result")
        if "meta" not in z.files:
            raise ValueError(f"path: {os.fspath(path)!r} is not a flatness landscape result (no 'meta')")
        meta: dict[str, Any] = json.loads(str(z["meta"]))
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("kind") not in _KINDS:
            get = meta.get if isinstance(meta, dict) else (lambda _k: None)
            raise ValueError(f"path: unsupported landscape file (format {get('format')}, kind {get('kind')})")
        directions = [
            {name: torch.from_numpy(z[f"direction{i}::{name}"].copy()) for name in names}
            for i, names in enumerate(meta["directions"])
        ]
        return _KINDS[meta["kind"]](
            loss=z["loss"].copy(),
            alphas=z["alphas"].copy(),
            betas=z["betas"].copy() if "betas" in z.files else None,
            metrics={m: z[f"metric::{m}"].copy() for m in meta["metrics"]},
            directions=directions,
            center_loss=meta["center_loss"] if meta["center_loss"] is not None else float("nan"),
            done=z["done"].copy(),
            n_points=meta["n_points"],
            n_evaluated=meta["n_evaluated"],
            n_nonfinite=meta["n_nonfinite"],
            n_passes=meta["n_passes"],
            vectorized=meta["vectorized"],
            normalization=meta["normalization"],
            seed=meta["seed"],
        )
