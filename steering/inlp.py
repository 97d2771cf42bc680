"""INLP concept erasure: remove the linearly decodable part of a concept from activations.

Iterative Nullspace Projection (Ravfogel et al. 2020, "Null It Out: Guarding Protected Attributes by Iterative
Nullspace Projection"). Given activations X [n, d] and integer labels y (binary or multi-class), each iteration
trains a linear probe (scikit-learn: ``LogisticRegression`` by default, ``LinearSVC`` with
``classifier="svm"``) on the *currently projected* X, orthonormalises its weight rows against the directions
already found and appends them to an orthonormal basis B [rank, d]. The erasure projects onto the intersection
of all the probes' nullspaces, computed from the stacked rowspaces: ``P = I - B^T B`` (not the product of the
per-iteration projections). A multinomial logistic probe's K rows are centred first: softmax only sees their
differences, which span K - 1 directions.

Every iteration's probe is scored on a held-out dev split (``dev_fraction`` of each class, seeded), next to the
majority-class baseline (the share of the dev set's most common class). The loop stops early when a
probe's dev accuracy falls below ``min_accuracy`` (default: baseline + ``epsilon``); that probe's directions are
not removed. ``accuracies[i]`` is the dev accuracy of probe i, trained with probes 0..i-1 removed, so
``accuracies[0]`` is the probe on the raw activations; with ``converged`` the last entry is the accuracy
after the erasure, otherwise the loop ran out of ``n_iter`` (or of directions) before reaching it.

Centring (the default, ``centre=True``): the mean ``mu`` of all of X (it uses no labels) is subtracted before
fitting, and the erasure is ``x -> (x - mu) @ P + mu``: along the removed directions every activation is set to
the mean activation, elsewhere it is unchanged (a mean ablation of the concept subspace), which keeps residual
streams with a large common offset in distribution. ``centre=False`` is the paper's ``x -> x @ P``, which zeroes those directions.
The probes have an intercept, so the directions found hardly depend on the choice.

At generation time ``erasure.at(site)`` is a :class:`Projection`, which ``steering.steer`` and
``steering.generate`` accept in ``steer=[...]`` next to steering vectors, with the same modes: the projection
replaces the activation at the positions the mode selects and leaves the others alone.

On disk an erasure is a directory: ``inlp.json`` (format, version, d, rank, centring, accuracies, baseline,
provenance) and ``inlp.safetensors`` (``"basis"`` [rank, d] and, when centred, ``"mean"`` [d], float32);
``load`` checks every key, shape and dtype, and that the basis is orthonormal.

>>> from steering.vectors import read_activations
>>> X = read_activations(model, prompts, "blocks.2.hook_resid_post")       # [n, d]; labels: [n] ints
>>> erasure = INLP.fit(X, labels, n_iter=20, seed=0)
>>> erasure.accuracies, erasure.baseline, erasure.rank                   # e.g. [0.97, 0.55, 0.51], 0.52, 2
>>> text = generate(model, "She walked", steer=[erasure.at("blocks.2.hook_resid_post")], mode="all")
>>> erasure.save("runs/inlp-gender"); INLP.load("runs/inlp-gender")
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from probe.errors import SteerscopeError
from steering.vectors import read_meta

FORMAT = "steerscope.inlp"
FORMAT_VERSION = 1
_JSON_KEYS = {"format", "format_version", "d", "rank", "centred", "accuracies", "baseline", "converged",
              "provenance"}
Classifier = Literal["logistic", "svm"]
CLASSIFIERS = ("logistic", "svm")
_NEW_DIRECTION_TOL = 1e-4  # a probe's weights outside the removed span, relative to their largest row norm
_ORTHONORMAL_TOL = 1e-4  # |B B^T - I| allowed in a basis given or loaded


def _project(x: Tensor, P: Tensor, mean: Tensor | None, what: str) -> Tensor:
    """``x @ P`` (or ``(x - mean) @ P + mean``) over the last axis, in at least float32, in x's dtype."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1 or x.shape[-1] != P.shape[0]:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise SteerscopeError(f"{what} projects floating-point [..., {P.shape[0]}] activations, got {shape}")
    work = torch.promote_types(x.dtype, torch.float32)
    P = P.to(x.device, work)
    if mean is None:
        return (x.to(work) @ P).to(x.dtype)
    mean = mean.to(x.device, work)
    return ((x.to(work) - mean) @ P + mean).to(x.dtype)


@dataclass(repr=False)
class Projection:
    """Replace the activation x at ``site`` by ``(x - mean) @ P + mean`` (``x @ P`` when mean is None).

    ``P`` is taken as given (INLP's is an orthogonal projection; it is not re-checked here)."""

    site: str  # TL hook name, e.g. "blocks.2.hook_resid_post"
    P: Tensor  # [d, d] the projection, float32
    mean: Tensor | None = None  # [d] centre kept fixed by the projection (None: x @ P)
    provenance: dict[str, Any] = field(default_factory=dict)  # how it was made (JSON-serialisable)

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise SteerscopeError(f"a projection needs a site name, got {self.site!r}")
        P = torch.as_tensor(self.P)
        if P.ndim != 2 or P.shape[0] != P.shape[1] or P.numel() == 0:
            raise SteerscopeError(f"a projection matrix is square [d, d], got shape {tuple(P.shape)}")
        self.P = _finite_float(P, "a projection matrix")
        if self.mean is not None:
            mean = torch.as_tensor(self.mean)
            if tuple(mean.shape) != (self.d,):
                raise SteerscopeError(f"the projection's mean must have shape [{self.d}], got {tuple(mean.shape)}")
            self.mean = _finite_float(mean, "a projection's mean")

    @property
    def d(self) -> int:
        return self.P.shape[0]

    @property
    def positional(self) -> bool:
        """Always False: a projection acts on every position the mode selects (never ActAdd-style)."""
        return False

    def apply(self, x: Tensor) -> Tensor:
        """The projected activation, same shape and dtype as ``x`` [..., d]."""
        return _project(x, self.P, self.mean, repr(self))

    def to(self, device) -> Projection:
        mean = None if self.mean is None else self.mean.to(device)
        return Projection(self.site, self.P.to(device), mean, self.provenance)

    def __repr__(self) -> str:
        method = self.provenance.get("method", "projection")
        rank = self.provenance.get("rank", "?")
        return f"Projection({method}, site={self.site!r}, d={self.d}, removed={rank}, centred={self.mean is not None})"


@dataclass(repr=False)
class INLP:
    """A fitted INLP erasure: the removed directions ``basis`` and, when centred, the mean they are set to."""

    basis: Tensor  # [rank, d] orthonormal rows, in the order the probes found them (float32)
    mean: Tensor | None = None  # [d] mean of X, subtracted before and added back after projecting (None: x @ P)
    accuracies: list[float] = field(default_factory=list)  # dev accuracy of each iteration's probe
    baseline: float = float("nan")  # majority-class accuracy on the dev set
    converged: bool = False  # True when the last probe's dev accuracy fell below the stopping threshold
    provenance: dict[str, Any] = field(default_factory=dict)  # fit settings and data sizes (JSON-serialisable)

    def __post_init__(self) -> None:
        B = torch.as_tensor(self.basis)
        if B.ndim != 2 or B.shape[1] == 0:
            raise SteerscopeError(f"an INLP basis is [rank, d], got shape {tuple(B.shape)}")
        B = _finite_float(B, "an INLP basis").cpu()
        gram = B.double() @ B.double().T - torch.eye(B.shape[0], dtype=torch.float64)
        err = float(gram.abs().max()) if B.shape[0] else 0.0
        if err > _ORTHONORMAL_TOL:
            raise SteerscopeError(f"an INLP basis must have orthonormal rows (|B B^T - I| reaches {err:.3g})")
        self.basis = B
        if self.mean is not None:
            mean = torch.as_tensor(self.mean)
            if tuple(mean.shape) != (self.d,):
                raise SteerscopeError(f"the INLP mean must have shape [{self.d}], got {tuple(mean.shape)}")
            self.mean = _finite_float(mean, "the INLP mean").cpu()
        self.accuracies = [float(a) for a in self.accuracies]
        self.baseline = float(self.baseline)

    @property
    def d(self) -> int:
        return self.basis.shape[1]

    @property
    def rank(self) -> int:
        """Number of removed directions."""
        return self.basis.shape[0]

    @property
    def P(self) -> Tensor:
        """[d, d] orthogonal projection onto the intersection of the probes' nullspaces, ``I - B^T B`` (float32)."""
        B = self.basis.double()
        return (torch.eye(self.d, dtype=torch.float64) - B.T @ B).float()

    def project(self, x: Tensor) -> Tensor:
        """Erase the concept from ``x`` [..., d]: ``(x - mean) @ P + mean`` (``x @ P`` uncentred); x's dtype."""
        return _project(x, self.P, self.mean, repr(self))

    def at(self, site: str) -> Projection:
        """This erasure as an intervention at ``site``, for ``steer(model, [...])`` and ``generate(steer=[...])``."""
        return Projection(site, self.P, self.mean, {"method": "inlp", "rank": self.rank})

    def __repr__(self) -> str:
        accs = ", ".join(f"{a:.3f}" for a in self.accuracies)
        return (f"INLP(d={self.d}, rank={self.rank}, centred={self.mean is not None}, accuracies=[{accs}], "
                f"baseline={self.baseline:.3f}, converged={self.converged})")

    # --- fitting --------------------------------------------------------------------------------
    @classmethod
    def fit(cls, X, y, n_iter: int = 20, *, classifier: Classifier = "logistic", C: float = 1.0,
            dev_fraction: float = 0.25, seed: int = 0, min_accuracy: float | None = None, epsilon: float = 0.01,
            centre: bool = True, max_iter: int = 1000) -> INLP:
        """Fit up to ``n_iter`` probes on X [n, d] (float) and labels y [n] (ints, two or more classes).

        ``C`` is the probes' inverse L2 regularisation strength, ``max_iter`` their solver's iteration limit.
        The loop stops when a probe's dev accuracy is below ``min_accuracy`` (None: ``baseline + epsilon``),
        when a probe adds no new direction, or when all d directions are removed.
        """
        X, y = _check_data(X, y)
        _check_settings(n_iter, classifier, C, dev_fraction, min_accuracy, epsilon, max_iter)
        mean = X.mean(0) if centre else np.zeros(X.shape[1])
        Xc = X - mean
        train, dev = _split(y, dev_fraction, seed)
        baseline = float(np.unique(y[dev], return_counts=True)[1].max() / len(dev))
        stop_at = min_accuracy if min_accuracy is not None else baseline + epsilon
        B = np.zeros((0, X.shape[1]))
        accuracies, converged = [], False
        for i in range(n_iter):
            probe = _probe(classifier, C, seed + i, max_iter).fit(_remove(Xc[train], B), y[train])
            accuracies.append(float(probe.score(_remove(Xc[dev], B), y[dev])))
            if accuracies[-1] < stop_at:
                converged = True
                break
            new = _new_directions(_weight_rows(probe, classifier), B)
            B = np.concatenate([B, new])
            if len(new) == 0 or len(B) >= X.shape[1]:
                break
        prov = {"method": "inlp", "classifier": classifier, "C": float(C), "n_iter": n_iter, "seed": seed,
                "dev_fraction": float(dev_fraction), "stop_at": float(stop_at), "max_iter": max_iter,
                "n_train": len(train), "n_dev": len(dev), "classes": [int(c) for c in np.unique(y)]}
        return cls(torch.from_numpy(B).float(), torch.from_numpy(mean).float() if centre else None, accuracies,
                   baseline, converged, prov)

    # --- artifacts ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``inlp.json`` + ``inlp.safetensors`` into the directory ``path``."""
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "d": self.d, "rank": self.rank,
                "centred": self.mean is not None, "accuracies": self.accuracies, "baseline": self.baseline,
                "converged": self.converged, "provenance": self.provenance}
        try:
            text = json.dumps(meta, indent=2)
        except (TypeError, ValueError) as e:
            raise SteerscopeError(f"provenance must be JSON-serialisable: {e}") from e
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise SteerscopeError(f"{path} is a file; an INLP erasure is saved as a directory (inlp.json + "
                                  "inlp.safetensors): choose another path")
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"basis": self.basis.contiguous().cpu()}
        if self.mean is not None:
            tensors["mean"] = self.mean.contiguous().cpu()
        save_file(tensors, str(path / "inlp.safetensors"))
        (path / "inlp.json").write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> INLP:
        """Strict load: exactly the known JSON keys, the tensors they describe (shapes, float32), an orthonormal basis."""
        path = Path(path)
        meta = _read_meta(path / "inlp.json")
        state = _read_tensors(path / "inlp.safetensors")
        want = {"basis": [meta["rank"], meta["d"]], **({"mean": [meta["d"]]} if meta["centred"] else {})}
        if set(state) != set(want):
            raise SteerscopeError(f"{path}: inlp.safetensors holds {sorted(state)}, inlp.json describes {sorted(want)}")
        for name, shape in want.items():
            if list(state[name].shape) != shape or state[name].dtype != torch.float32:
                raise SteerscopeError(f"{path}: {name} is {state[name].dtype} {list(state[name].shape)}, "
                                      f"inlp.json says float32 {shape}")
        try:
            return cls(state["basis"], state.get("mean"), meta["accuracies"], meta["baseline"], meta["converged"],
                       meta["provenance"])
        except SteerscopeError as e:
            raise SteerscopeError(f"{path}: {e}") from e


# --- helpers -----------------------------------------------------------------------------------

def _finite_float(t: Tensor, what: str) -> Tensor:
    """``t`` as float32 on its device; one-line error when it is not floating point or not finite."""
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise SteerscopeError(f"{what} must be a finite floating-point tensor")
    return t.detach().float()


def _check_data(X, y) -> tuple[np.ndarray, np.ndarray]:
    """X as float64 [n, d], y as int [n]; one-line errors for anything else."""
    X = X.detach().cpu() if isinstance(X, Tensor) else torch.as_tensor(np.asarray(X))
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise SteerscopeError(f"X must be 2-D activations [n, d], got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise SteerscopeError(f"X must be floating point, got {X.dtype}")
    bad = int((~torch.isfinite(X)).any(1).sum())
    if bad:
        raise SteerscopeError(f"X has NaN or infinite values in {bad} of its {X.shape[0]} rows")
    y = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise SteerscopeError(f"y must be 1-D integer class labels, got {y.dtype} of shape {tuple(y.shape)}")
    if len(y) != X.shape[0]:
        raise SteerscopeError(f"X has {X.shape[0]} rows but y has {len(y)} labels")
    classes = np.unique(y)
    if len(classes) < 2:
        raise SteerscopeError(f"y has a single class ({classes[0]!r}); INLP needs at least two")
    return X.double().numpy(), y.astype(np.int64)


def _check_settings(n_iter, classifier, C, dev_fraction, min_accuracy, epsilon, max_iter) -> None:
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise SteerscopeError(f"n_iter must be a positive integer, got {n_iter!r}")
    if classifier not in CLASSIFIERS:
        raise SteerscopeError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    if isinstance(C, bool) or not isinstance(C, int | float) or not (math.isfinite(C) and C > 0):
        raise SteerscopeError(f"C must be a positive number, got {C!r}")
    if isinstance(dev_fraction, bool) or not isinstance(dev_fraction, int | float) or not 0 < dev_fraction < 1:
        raise SteerscopeError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    if min_accuracy is not None and not (isinstance(min_accuracy, int | float) and 0 <= min_accuracy <= 1):
        raise SteerscopeError(f"min_accuracy must be in [0, 1] or None, got {min_accuracy!r}")
    if not (isinstance(epsilon, int | float) and 0 <= epsilon < 1):
        raise SteerscopeError(f"epsilon must be in [0, 1), got {epsilon!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise SteerscopeError(f"max_iter must be a positive integer, got {max_iter!r}")


def _split(y: np.ndarray, dev_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train, dev) row indices; every class keeps at least one training row."""
    rng = np.random.default_rng(seed)
    dev = []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        dev.append(rows[:min(round(dev_fraction * len(rows)), len(rows) - 1)])
    dev = np.sort(np.concatenate(dev))
    if len(dev) == 0:
        raise SteerscopeError(f"the dev split is empty ({len(y)} rows, dev_fraction={dev_fraction}); "
                              "give more rows or a larger dev_fraction")
    return np.setdiff1d(np.arange(len(y)), dev), dev


def _probe(classifier: Classifier, C: float, seed: int, max_iter: int):
    if classifier == "svm":
        from sklearn.svm import LinearSVC

        return LinearSVC(C=C, dual="auto", max_iter=max_iter, random_state=seed)
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=max_iter, random_state=seed)


def _weight_rows(probe, classifier: Classifier) -> np.ndarray:
    """The probe's weight rows [1 or K, d]; a multinomial logistic probe's rows centred (softmax sees differences)."""
    W = np.asarray(probe.coef_, dtype=np.float64)
    return W - W.mean(0) if classifier == "logistic" and len(W) > 1 else W


def _remove(X: np.ndarray, B: np.ndarray) -> np.ndarray:
    """X with its components along the orthonormal rows of B removed: X (I - B^T B)."""
    return X - (X @ B.T) @ B if len(B) else X


def _new_directions(W: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the part of W's rowspace outside span(B) (so [B; new] stays orthonormal)."""
    scale = float(np.linalg.norm(W, axis=1).max(initial=0.0))
    if not scale > 0:
        return np.zeros((0, W.shape[1]))
    R = _remove(_remove(W / scale, B), B)  # twice: Gram-Schmidt's second pass keeps it orthogonal in floats
    _, s, Vt = np.linalg.svd(R, full_matrices=False)
    return _remove(Vt[s > _NEW_DIRECTION_TOL], B)


def _read_meta(file: Path) -> dict[str, Any]:
    meta = read_meta(file, _JSON_KEYS, FORMAT, FORMAT_VERSION, "an INLP directory", "INLP erasure")
    ints_ok = all(isinstance(meta[k], int) and not isinstance(meta[k], bool) for k in ("d", "rank"))
    accs_ok = isinstance(meta["accuracies"], list) and all(isinstance(a, int | float) for a in meta["accuracies"])
    if not (ints_ok and meta["d"] > 0 and meta["rank"] >= 0) or not accs_ok \
            or not isinstance(meta["baseline"], int | float) or not isinstance(meta["centred"], bool) \
            or not isinstance(meta["converged"], bool) or not isinstance(meta["provenance"], dict):
        raise SteerscopeError(f"{file}: malformed d, rank, centred, accuracies, baseline, converged or provenance")
    return meta


def _read_tensors(file: Path) -> dict[str, Tensor]:
    if not file.exists():
        raise SteerscopeError(f"{file.parent}: inlp.safetensors is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise SteerscopeError(f"{file} is corrupted or truncated ({str(e).splitlines()[0][:100]})") from e
