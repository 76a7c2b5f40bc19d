"""The interface every concept-bottleneck head implements.

A *head* is a classifier on frozen features that reasons through ``k`` concepts: it maps features
``Z [n, d]`` to concept scores ``S [n, k]`` and concept scores to class logits ``[n, K]``. Everything a
user does with a head is defined on those two maps, once, in :class:`ConceptHead`:

==================================  =======================================================================
``fit(X, y, concepts=None)``        ``X``: features ``[n, d]``, or images plus ``encoder=``; ``concepts``:
                                    optional boolean concept labels (DataFrame ``[n, m]``)
``predict`` / ``predict_proba``     class labels ``[n]`` / probabilities ``[n, K]`` (softmax of the logits)
``decision_function``               class logits ``[n, K]``
``score(X, y)``                     accuracy
``concept_scores(X)``               ``[n, k]``: the bottleneck
``predict_proba_from_concepts(S)``  probabilities from (edited) concept scores
``intervene(X, {c: v})``            probabilities after setting concepts to values (see below)
``concept_values(truth)``           ground-truth concept labels in the head's own concept units
``explain(X)``                      per prediction, the top contributing concepts (DataFrame)
``bank_``                           the :class:`~concepts.bank.ConceptBank` the head reasons with
==================================  =======================================================================

Interventions
-------------
``intervene(X, {concept: value})`` sets concept ``concept`` (a name, the ground-truth name the concept
carries, or an index) to ``value`` for every sample and returns the class probabilities. A value is

- a number: the raw concept score;
- ``True`` / ``False`` or ``"on"`` / ``"off"``: the concept's *on* / *off* value (below);
- ``"pXX"`` (``"p95"``, ``"p2.5"``): the XX-th percentile of the concept's training distribution;
  ``"mean"``: its training mean;
- ``"truth"``: the ground truth, read from ``concepts=`` (a DataFrame with a column of the concept's
  ground-truth name), mapped to the on / off value per sample;
- an array ``[n]``: per-sample raw values (numeric) or per-sample truth (boolean).

A list of concepts instead of a mapping means ``"truth"`` for each. On / off values: heads trained with
concept supervision use their own (probability 1 / 0). Other heads use, for concepts whose ground-truth
name had labels at fit time, the median training score of the positive / negative samples; for all other
concepts the 95th / 5th percentile of the training scores (the replacement values of Koh et al. 2020). So
heads without concept labels still support interventions on their own concepts.

Explanations
------------
The contribution of concept ``j`` to the logit of class ``c`` is the change of that logit when ``S_j`` is
replaced by the concept's *baseline* (its training mean unless a head says otherwise; 0 for SAE codes).
For heads whose logits are linear in the concepts this is exactly ``W[c, j] * (S_j - baseline_j)`` (after
the head's input scaling), and the contributions sum to the logit minus the logit at the baseline.

Writing a head
--------------
Subclass :class:`ConceptHead`, list every parameter in ``__init__`` (stored unchanged, sklearn style;
include ``encoder``, ``device``, ``random_state`` and ``verbose``) and implement ``_fit(Z, y, C)`` (must set
``bank_``), ``_scores(Z)`` and ``_logits(S)``. Optionally override ``_baseline``, ``_contributions``,
``_on_off`` (concept-supervised heads), ``_truth_names``, ``_intervened_logits(S, mask)`` (heads that
re-infer the non-intervened concepts, e.g. energy-based CBMs) and ``_summary_html``. ``fit`` runs
``_fit`` inside a forked, seeded torch RNG, so heads may use ``torch.nn`` initialisers freely.

Examples
--------
>>> import numpy as np
>>> from cbm import LinearProbe
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(60, 3)); y = (X[:, 0] > 0).astype(int)
>>> head = LinearProbe().fit(X, y)
>>> head.score(X, y) > 0.9
True
>>> head.explain(X[:1], top=1)[["concept", "rank"]].values.tolist()
[['feature_0', 1]]
"""
from __future__ import annotations

import difflib
import html
import logging
import numbers
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError
from torch import Tensor

from concepts.devices import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["ConceptHead", "as_concept_frame", "InterventionValue"]

InterventionValue = Any  # number | bool | str | array [n]
"""A concept value accepted by :meth:`ConceptHead.intervene` (see the module docstring)."""

_CHUNK = 8192  # rows per forward pass at prediction time
_PERCENTILE = re.compile(r"^p(\d+(\.\d+)?)$")
_QUANTILE_GRID = np.linspace(0.0, 100.0, 201)


def as_concept_frame(concepts: Any, n: int | None = None, *, what: str = "concepts") -> pd.DataFrame:
    """Validate concept labels: a boolean DataFrame ``[n, m]`` (0/1 and bool arrays are converted).

    Parameters
    ----------
    concepts
        DataFrame of bool / 0-1 columns, or an array ``[n, m]`` (columns become ``concept_0`` ...).
    n
        Expected number of rows.
    what
        Name used in error messages.

    Examples
    --------
    >>> as_concept_frame(np.array([[1, 0], [0, 1]])).dtypes.tolist()
    [dtype('bool'), dtype('bool')]
    """
    if isinstance(concepts, pd.DataFrame):
        df = concepts
    elif isinstance(concepts, (np.ndarray, Tensor)):
        arr = concepts.detach().cpu().numpy() if isinstance(concepts, Tensor) else concepts
        if arr.ndim != 2:
            raise ValueError(f"{what} must be a DataFrame or an array [n, m]; got an array of shape {arr.shape}.")
        df = pd.DataFrame(arr, columns=[f"concept_{i}" for i in range(arr.shape[1])])
    else:
        raise TypeError(
            f"{what} must be a pandas DataFrame with one boolean column per concept (e.g. ConceptWorld's "
            f"batch.concepts) or an array [n, m]; got {type(concepts).__name__}."
        )
    if n is not None and len(df) != n:
        raise ValueError(f"X has {n} samples but {what} has {len(df)} rows; pass one label row per sample.")
    if df.shape[1] == 0:
        raise ValueError(f"{what} has no columns; pass one boolean column per concept.")
    out = {}
    for col in df.columns:
        vals = df[col].to_numpy()
        if vals.dtype != np.bool_:
            try:
                num = vals.astype(np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{what} column {col!r} must be boolean or 0/1; got dtype {vals.dtype}.") from None
            if not np.isin(num, (0.0, 1.0)).all():
                raise ValueError(
                    f"{what} column {col!r} must be boolean or 0/1; got values such as "
                    f"{sorted(set(num[~np.isin(num, (0.0, 1.0))].tolist()))[:3]}."
                )
            vals = num.astype(bool)
        out[str(col)] = vals
    return pd.DataFrame(out, index=pd.RangeIndex(len(df)))


def feature_standardizer(S: Tensor, standardize: bool = True) -> tuple[Tensor, Tensor]:
    """Per-feature mean and scale (CPU tensors ``[d]``) that heads store as ``input_mean_`` / ``input_scale_``.

    Constant features get scale 1 (not 0), so ``(S - mean) / scale`` is always finite; ``standardize=False`` gives
    the identity (zeros, ones).

    Examples
    --------
    >>> m, s = feature_standardizer(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
    >>> m.tolist(), s.tolist()
    ([2.0, 5.0], [1.4142135381698608, 1.0])
    """
    if not standardize:
        return torch.zeros(S.shape[1]), torch.ones(S.shape[1])
    mean = S.mean(0).cpu()
    std = S.std(0).cpu()
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def select_concept_columns(concepts: pd.DataFrame, concept_columns: Any) -> list[str]:
    """The concept columns a concept-supervised head trains on: all of ``concepts`` when ``concept_columns`` is None.

    Raises
    ------
    TypeError
        ``concept_columns`` is a single string.
    ValueError
        It is empty or has repeats.
    KeyError
        It names columns that ``concepts`` lacks.

    Examples
    --------
    >>> select_concept_columns(pd.DataFrame({"red": [1], "blue": [0]}), ["blue"])
    ['blue']
    """
    if concept_columns is None:
        return [str(c) for c in concepts.columns]
    if isinstance(concept_columns, str):
        raise TypeError(f"concept_columns must be a list of column names; got the string {concept_columns!r}.")
    cols = [str(c) for c in concept_columns]
    if not cols:
        raise ValueError("concept_columns is empty; give at least one concept column.")
    missing = [c for c in cols if c not in concepts.columns]
    if missing:
        raise KeyError(
            f"concept_columns {missing[:5]} are not columns of concepts (which has {list(concepts.columns)[:8]}...)."
        )
    if len(set(cols)) != len(cols):
        raise ValueError(f"concept_columns has repeats: {cols}.")
    return cols


def supervised_inputs(head: Any, Z: Tensor, concepts: pd.DataFrame | None) -> tuple[list[str], Tensor, Tensor]:
    """Shared start of a concept-supervised head's ``_fit``: concept columns, targets and standardised features.

    Sets ``head.input_mean_`` / ``head.input_scale_`` (:func:`feature_standardizer`) and returns ``(columns,
    targets [n, k] float32 on Z's device, standardised Z [n, d])``; ``head.concept_columns`` selects the columns.
    """
    if concepts is None:  # fit() checks this already; kept for direct calls
        raise ValueError(f"{type(head).__name__} needs concept labels: pass concepts=DataFrame to fit.")
    cols = select_concept_columns(concepts, head.concept_columns)
    T = torch.from_numpy(concepts[cols].to_numpy(dtype=np.float32, copy=True)).to(Z.device)
    head.input_mean_, head.input_scale_ = feature_standardizer(Z)
    Zs = (Z - head.input_mean_.to(Z.device)) / head.input_scale_.to(Z.device)
    return cols, T, Zs


def _softmax_np(logits: Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=1).cpu().numpy()


class ConceptHead(ClassifierMixin, BaseEstimator):
    """Base class of the concept-bottleneck heads (see the module docstring for the contract).

    Attributes (after fit)
    ----------------------
    classes_ : ndarray [K]
        Class labels (sorted unique ``y``).
    n_features_in_ : int
        Feature dimension ``d``.
    bank_ : ConceptBank
        The ``k`` concepts the head reasons with (names, vectors in feature space where meaningful).
    concept_mean_, concept_std_ : ndarray [k]
        Training mean / standard deviation of the concept scores.
    concept_on_, concept_off_ : ndarray [k]
        Values used for ``True`` / ``False`` / ``"truth"`` interventions.
    concept_quantiles_ : ndarray [201, k]
        Training percentiles 0, 0.5, ..., 100 of each concept score.
    concept_truth_names_ : list of str
        The ground-truth name each concept is matched to (default: its bank name).
    fit_time_ : float
        Seconds spent in ``fit`` after the features were computed.
    """

    _requires_concepts: bool = False

    # ------------------------------------------------------------------ subclass hooks
    def _fit(self, Z: Tensor, y: Tensor, C: pd.DataFrame | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _scores(self, Z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _logits(self, S: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _intervened_logits(self, S: Tensor, intervened: Tensor) -> Tensor:
        """Logits when the concepts in the boolean mask ``intervened [n, k]`` were set by an intervention.

        The default ignores the mask (the label head simply reads the edited scores). Heads that infer
        concepts jointly (energy-based CBMs) override it to clamp the intervened concepts and re-infer the
        others.
        """
        return self._logits(S)

    def _validate_params(self) -> None:
        """Check the constructor arguments (called at the start of fit)."""

    def _on_off(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Head-defined on / off values ``([k], [k])``, or None to derive them from training data."""
        return None

    def _truth_names(self) -> list[str]:
        return list(self.bank_.names)

    def _baseline(self) -> Tensor:
        return torch.as_tensor(self.concept_mean_, dtype=torch.float32)

    def _contributions(self, S: Tensor, target: Tensor) -> Tensor:
        """Occlusion contributions ``[n, k]``: logit(target) minus the logit with concept j at its baseline."""
        base = self._baseline().to(S.device)
        ref = self._logits(S).gather(1, target[:, None])[:, 0]
        out = torch.empty_like(S)
        for j in range(S.shape[1]):
            S2 = S.clone()
            S2[:, j] = base[j]
            out[:, j] = ref - self._logits(S2).gather(1, target[:, None])[:, 0]
        return out

    def _summary_html(self) -> str:
        return ""

    # ------------------------------------------------------------------ plumbing
    @property
    def _device(self) -> torch.device:
        return resolve_device(getattr(self, "device", "cpu") or "cpu")

    @property
    def _seed(self) -> int:
        rs = getattr(self, "random_state", 0)
        return 0 if rs is None else int(rs)

    def _check_fitted(self) -> None:
        if not hasattr(self, "bank_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with appropriate arguments "
                "before using this estimator."
            )

    def _features(self, X: Any, *, fitting: bool = False) -> Tensor:
        """Features ``[n, d]`` float32 on the head's device: X itself, or images encoded by ``encoder``."""
        if isinstance(X, pd.DataFrame):
            X = X.to_numpy()
        if hasattr(X, "images") and not isinstance(X, (np.ndarray, Tensor)):
            X = X.images  # a ConceptWorld batch
        if isinstance(X, (np.ndarray, Tensor)) and X.ndim == 2:
            if isinstance(X, np.ndarray):
                if not (np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_):
                    raise TypeError(f"X must be numeric features [n, d]; got an array of dtype {X.dtype}.")
                Z = torch.from_numpy(np.ascontiguousarray(X))
            else:
                Z = X.detach()
            Z = Z.to(self._device, torch.float32)
        else:
            encoder = getattr(self, "encoder", None)
            if encoder is None or not hasattr(encoder, "encode_images"):
                shape = getattr(X, "shape", None)
                raise TypeError(
                    f"X must be features [n, d] (2-D array or tensor); got {type(X).__name__}"
                    f"{'' if shape is None else ' of shape ' + str(tuple(shape))}. To pass images, give the head an "
                    "image encoder: encoder=OpenCLIPEncoder(model, preprocess, tokenizer)."
                )
            with torch.no_grad():
                Z = encoder.encode_images(X, normalize=True)
            if isinstance(Z, np.ndarray):
                Z = torch.from_numpy(Z)
            Z = Z.detach().to(self._device, torch.float32)
        if Z.shape[0] == 0:
            raise ValueError(f"X has 0 samples; {type(self).__name__} needs at least one.")
        if not torch.isfinite(Z).all():
            raise ValueError("X contains NaN or infinite values; clean the features first.")
        if fitting:
            self.n_features_in_ = int(Z.shape[1])
        elif Z.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {Z.shape[1]} features, but {type(self).__name__} is expecting {self.n_features_in_} "
                "features as input."
            )
        return Z

    def _encode_y(self, y: Any, n: int) -> Tensor:
        arr = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
        if arr.ndim != 1:
            raise ValueError(f"y must be a 1-D array of class labels [n]; got shape {arr.shape}.")
        if len(arr) != n:
            raise ValueError(f"X has {n} samples but y has {len(arr)}; pass one label per sample.")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError("y contains NaN or infinite values; pass class labels.")
        self.classes_ = np.unique(arr)
        if len(self.classes_) < 2:
            raise ValueError(
                f"y has a single class ({self.classes_[0]!r}); a classifier needs at least 2 classes."
            )
        return torch.as_tensor(np.searchsorted(self.classes_, arr), dtype=torch.long, device=self._device)

    def _class_index(self, y: Any) -> np.ndarray:
        arr = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
        idx = np.searchsorted(self.classes_, arr)
        idx = np.clip(idx, 0, len(self.classes_) - 1)
        bad = self.classes_[idx] != arr
        if bad.any():
            raise ValueError(
                f"y contains labels the head was not fitted on, e.g. {arr[bad][0]!r}; known classes: "
                f"{list(self.classes_)[:10]}."
            )
        return idx

    def _chunked(self, fn, Z: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([fn(Z[i:i + _CHUNK]) for i in range(0, Z.shape[0], _CHUNK)])

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any, concepts: pd.DataFrame | np.ndarray | None = None) -> ConceptHead:
        """Fit the head.

        Parameters
        ----------
        X
            Features ``[n, d]`` (array or tensor), or images (uint8 ``[n, H, W, 3]``, PIL images, paths,
            a ConceptWorld batch) when the head has an ``encoder``.
        y
            Class labels ``[n]``.
        concepts
            Optional concept labels: a boolean DataFrame ``[n, m]`` (e.g. ConceptWorld's
            ``batch.concepts``). Concept-supervised heads need it; the others use it to calibrate the
            on / off values of the concepts whose names it has.

        Returns
        -------
        self
        """
        self._validate_params()
        Z = self._features(X, fitting=True)
        n = Z.shape[0]
        yt = self._encode_y(y, n)
        C = None if concepts is None else as_concept_frame(concepts, n)
        if C is None and self._requires_concepts:
            raise ValueError(
                f"{type(self).__name__} is trained with concept supervision: pass concepts=DataFrame of boolean "
                "concept labels [n, m] to fit (e.g. batch.concepts of a ConceptWorld sample)."
            )
        t0 = time.perf_counter()
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._seed)
            self._fit(Z, yt, C)
        S = self._chunked(self._scores, Z)
        self._set_concept_stats(S, C)
        self.fit_time_ = time.perf_counter() - t0
        return self

    def _set_concept_stats(self, S: Tensor, C: pd.DataFrame | None) -> None:
        Sn = S.detach().cpu().double().numpy()
        self.concept_mean_ = Sn.mean(0)
        self.concept_std_ = Sn.std(0)
        self.concept_quantiles_ = np.percentile(Sn, _QUANTILE_GRID, axis=0)
        self.concept_truth_names_ = self._truth_names()
        on_off = self._on_off()
        if on_off is not None:
            on, off = (np.asarray(v, dtype=np.float64) for v in on_off)
        else:
            on = np.percentile(Sn, 95, axis=0)
            off = np.percentile(Sn, 5, axis=0)
            if C is not None:
                for j, name in enumerate(self.concept_truth_names_):
                    if name in C.columns:
                        lab = C[name].to_numpy()
                        if lab.any() and (~lab).any():
                            on[j] = np.median(Sn[lab, j])
                            off[j] = np.median(Sn[~lab, j])
        self.concept_on_, self.concept_off_ = on, off

    # ------------------------------------------------------------------ predict
    def decision_function(self, X: Any) -> np.ndarray:
        """Class logits ``[n, K]``."""
        self._check_fitted()
        Z = self._features(X)
        return self._chunked(lambda z: self._logits(self._scores(z)), Z).cpu().numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``[n, K]`` (softmax of the logits), columns in ``classes_`` order."""
        self._check_fitted()
        Z = self._features(X)
        return _softmax_np(self._chunked(lambda z: self._logits(self._scores(z)), Z))

    def predict(self, X: Any) -> np.ndarray:
        """Class labels ``[n]``."""
        self._check_fitted()
        return self.classes_[self.predict_proba(X).argmax(1)]

    def concept_scores(self, X: Any) -> np.ndarray:
        """The bottleneck: concept scores ``[n, k]`` (columns = ``bank_.names``)."""
        self._check_fitted()
        return self._chunked(self._scores, self._features(X)).cpu().numpy()

    def _as_scores(self, S: Any) -> Tensor:
        S = S.detach() if isinstance(S, Tensor) else torch.tensor(np.asarray(S, dtype=np.float32))
        k = self.bank_.n_concepts
        if S.ndim != 2 or S.shape[1] != k:
            raise ValueError(
                f"concept scores have shape {tuple(S.shape)}, but {type(self).__name__} has {k} concepts; pass an "
                f"array [n, {k}] (e.g. from concept_scores(X))."
            )
        return S.to(self._device, torch.float32)

    def predict_proba_from_concepts(self, S: Any, intervened: Any = None) -> np.ndarray:
        """Class probabilities ``[n, K]`` from concept scores ``[n, k]`` (edited or not).

        Parameters
        ----------
        S
            Concept scores ``[n, k]``.
        intervened
            Optional boolean mask ``[n, k]`` of the scores that were set by an intervention (heads that
            re-infer the other concepts use it; for the others it changes nothing).
        """
        self._check_fitted()
        St = self._as_scores(S)
        if intervened is None:
            return _softmax_np(self._chunked(self._logits, St))
        M = torch.as_tensor(np.asarray(intervened, dtype=bool), device=St.device)
        if M.shape != St.shape:
            raise ValueError(f"intervened has shape {tuple(M.shape)}; expected the shape of S, {tuple(St.shape)}.")
        with torch.no_grad():
            out = torch.cat([self._intervened_logits(St[i:i + _CHUNK], M[i:i + _CHUNK])
                             for i in range(0, St.shape[0], _CHUNK)])
        return _softmax_np(out)

    # ------------------------------------------------------------------ concepts and interventions
    @property
    def concept_names_(self) -> list[str]:
        """The head's concept names (``bank_.names``)."""
        self._check_fitted()
        return list(self.bank_.names)

    def concept_indices(self, concept: str | int) -> list[int]:
        """Indices of a concept given by ground-truth name (all concepts carrying it), bank name or index.

        Examples
        --------
        >>> import numpy as np
        >>> from cbm import LinearProbe
        >>> head = LinearProbe().fit(np.eye(3), [0, 1, 1])
        >>> head.concept_indices("feature_2"), head.concept_indices(-1)
        ([2], [2])
        """
        self._check_fitted()
        k = self.bank_.n_concepts
        if isinstance(concept, (numbers.Integral, np.integer)) and not isinstance(concept, (bool, np.bool_)):
            j = int(concept)
            if not -k <= j < k:
                raise IndexError(f"concept index {j} is out of range for {type(self).__name__} with {k} concepts.")
            return [j % k]
        if not isinstance(concept, str):
            raise TypeError(f"a concept is a name (str) or an index (int); got {type(concept).__name__}.")
        names = list(self.bank_.names)
        hits = [j for j, t in enumerate(self.concept_truth_names_) if t == concept]
        if hits:
            return hits
        if concept in names:
            return [names.index(concept)]
        close = difflib.get_close_matches(concept, list(dict.fromkeys(names + self.concept_truth_names_)), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"{type(self).__name__} has no concept named {concept!r}.{hint} Its concepts: {names[:8]}...")

    def concept_values(self, truth: pd.DataFrame | Mapping[str, Any]) -> np.ndarray:
        """Ground-truth labels in the head's concept units: ``[n, k]``, NaN where the truth has no column.

        Concept ``j`` reads the column named ``concept_truth_names_[j]``; True becomes ``concept_on_[j]``,
        False ``concept_off_[j]``.
        """
        self._check_fitted()
        table = truth if isinstance(truth, pd.DataFrame) else pd.DataFrame(dict(truth))
        table = as_concept_frame(table, what="truth")
        out = np.full((len(table), self.bank_.n_concepts), np.nan)
        for j, name in enumerate(self.concept_truth_names_):
            if name in table.columns:
                lab = table[name].to_numpy()
                out[:, j] = np.where(lab, self.concept_on_[j], self.concept_off_[j])
        return out

    def _resolve_value(self, j: int, key: Any, value: Any, n: int, truth: pd.DataFrame | None) -> np.ndarray:
        on, off = self.concept_on_[j], self.concept_off_[j]
        if isinstance(value, (bool, np.bool_)):
            return np.full(n, on if value else off)
        if isinstance(value, numbers.Number):
            v = float(value)  # type: ignore[arg-type]
            if not np.isfinite(v):
                raise ValueError(f"intervention value for {key!r} must be finite; got {value!r}.")
            return np.full(n, v)
        if isinstance(value, str):
            if value == "on":
                return np.full(n, on)
            if value == "off":
                return np.full(n, off)
            if value == "mean":
                return np.full(n, self.concept_mean_[j])
            m = _PERCENTILE.match(value)
            if m:
                q = float(m.group(1))
                if q > 100:
                    raise ValueError(f"percentile {value!r} for {key!r} must be between p0 and p100.")
                return np.full(n, np.interp(q, _QUANTILE_GRID, self.concept_quantiles_[:, j]))
            if value == "truth":
                name = self.concept_truth_names_[j]
                if truth is None:
                    raise ValueError(
                        f"intervening on {key!r} with 'truth' needs the ground truth: pass concepts=DataFrame with a "
                        f"column {name!r} (e.g. batch.concepts)."
                    )
                if name not in truth.columns:
                    raise KeyError(
                        f"the ground truth has no column {name!r} for concept {key!r}; columns: "
                        f"{list(truth.columns)[:8]}..."
                    )
                lab = truth[name].to_numpy()
                return np.where(lab, on, off)
            raise ValueError(
                f"unknown intervention value {value!r} for {key!r}; use a number, True/False, 'on', 'off', 'mean', "
                "'truth', a percentile such as 'p95', or an array [n]."
            )
        arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        if arr.ndim != 1 or len(arr) != n:
            raise ValueError(
                f"intervention value for {key!r} has shape {arr.shape}; expected a scalar or an array [{n}] "
                "(one value per sample)."
            )
        if arr.dtype == np.bool_:
            return np.where(arr, on, off)
        if not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"intervention values for {key!r} must be numbers or booleans; got dtype {arr.dtype}.")
        if not np.isfinite(arr).all():
            raise ValueError(f"intervention values for {key!r} contain NaN or infinite values.")
        return arr.astype(np.float64)

    def intervened_scores(
        self,
        X: Any,
        interventions: Mapping[str | int, InterventionValue] | Iterable[str | int],
        *,
        concepts: pd.DataFrame | None = None,
    ) -> np.ndarray:
        """Concept scores ``[n, k]`` with the interventions applied (see :meth:`intervene`)."""
        return self._apply_interventions(X, interventions, concepts)[0]

    def _apply_interventions(
        self, X: Any, interventions: Any, concepts: pd.DataFrame | None
    ) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        S = self.concept_scores(X).astype(np.float64)
        mask = np.zeros(S.shape, dtype=bool)
        n = S.shape[0]
        if isinstance(interventions, Mapping):
            items = list(interventions.items())
        elif isinstance(interventions, (str, bytes)) or not isinstance(interventions, Iterable):
            raise TypeError(
                "interventions must be a mapping {concept: value} or a list of concepts (set to their ground truth); "
                f"got {type(interventions).__name__}."
            )
        else:
            items = [(c, "truth") for c in interventions]
        truth = None if concepts is None else as_concept_frame(concepts, n, what="concepts")
        for key, value in items:
            for j in self.concept_indices(key):
                S[:, j] = self._resolve_value(j, key, value, n, truth)
                mask[:, j] = True
        return S, mask

    def intervene(
        self,
        X: Any,
        interventions: Mapping[str | int, InterventionValue] | Iterable[str | int],
        *,
        concepts: pd.DataFrame | None = None,
    ) -> np.ndarray:
        """Class probabilities ``[n, K]`` after setting concepts to values.

        Parameters
        ----------
        X
            Features or images, as in :meth:`predict_proba`.
        interventions
            ``{concept: value}`` (concept: name, ground-truth name or index; value: number, ``True`` /
            ``False``, ``"on"`` / ``"off"``, ``"mean"``, ``"pXX"``, ``"truth"``, or an array ``[n]``), or a
            list of concepts to set to their ground truth.
        concepts
            Ground-truth concept labels (DataFrame ``[n, m]``), needed for ``"truth"``.

        Returns
        -------
        ndarray
            ``[n, K]`` probabilities.

        Examples
        --------
        >>> import numpy as np
        >>> from cbm import LinearProbe
        >>> X = np.array([[1.0, 0.0], [0.0, 1.0]] * 10); y = np.array([0, 1] * 10)
        >>> head = LinearProbe().fit(X, y)
        >>> head.intervene(X[:1], {"feature_0": 0.0, "feature_1": 1.0}).argmax(1).tolist()
        [1]
        """
        S, mask = self._apply_interventions(X, interventions, concepts)
        return self.predict_proba_from_concepts(S, intervened=mask)

    # ------------------------------------------------------------------ explanations
    def contributions(self, X: Any, target: Any = None) -> np.ndarray:
        """Contribution of every concept to the logit of ``target`` (default: the prediction), ``[n, k]``."""
        self._check_fitted()
        Z = self._features(X)
        with torch.no_grad():
            S = self._chunked(self._scores, Z)
            if target is None:
                t = self._chunked(self._logits, S).argmax(1)
            else:
                t = torch.as_tensor(self._class_index(np.broadcast_to(np.asarray(target), (len(S),))), device=S.device)
            return torch.cat([
                self._contributions(S[i:i + _CHUNK], t[i:i + _CHUNK]) for i in range(0, len(S), _CHUNK)
            ]).cpu().numpy()

    def explain(self, X: Any, *, top: int | None = 5, target: Any = None) -> pd.DataFrame:
        """Per prediction, the concepts contributing most to the logit of the predicted (or given) class.

        Parameters
        ----------
        X
            Features or images.
        top
            Concepts per sample, by absolute contribution (None: all).
        target
            Class to explain (one label or one per sample); default the predicted class.

        Returns
        -------
        pd.DataFrame
            One row per (sample, concept): ``sample``, ``prediction``, ``target``, ``rank`` (1 = largest
            absolute contribution), ``concept``, ``score`` (the concept score), ``baseline``,
            ``contribution`` and ``share`` (contribution / sum of absolute contributions of the sample).
        """
        self._check_fitted()
        if top is not None and (isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1):
            raise ValueError(f"top must be a positive integer or None; got {top!r}.")
        Z = self._features(X)
        with torch.no_grad():
            S = self._chunked(self._scores, Z)
            pred = self._chunked(self._logits, S).argmax(1)
        contrib = self.contributions(Z, target)
        Sn = S.cpu().numpy()
        tgt = pred.cpu().numpy() if target is None else self._class_index(np.broadcast_to(np.asarray(target), (len(Sn),)))
        base = self._baseline().cpu().numpy()
        k = contrib.shape[1]
        m = k if top is None else min(int(top), k)
        order = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :m]
        total = np.abs(contrib).sum(1, keepdims=True)
        total[total == 0] = 1.0
        rows = np.repeat(np.arange(len(Sn)), m)
        cols = order.ravel()
        names = np.asarray(self.bank_.names, dtype=object)
        return pd.DataFrame({
            "sample": rows,
            "prediction": self.classes_[pred.cpu().numpy()][rows],
            "target": self.classes_[tgt][rows],
            "rank": np.tile(np.arange(1, m + 1), len(Sn)),
            "concept": names[cols],
            "score": Sn[rows, cols],
            "baseline": base[cols],
            "contribution": contrib[rows, cols],
            "share": (contrib / total)[rows, cols],
        })

    # ------------------------------------------------------------------ display
    def _repr_html_(self) -> str:
        name = html.escape(type(self).__name__)
        rows = []
        for k, v in self.get_params(deep=False).items():
            text = repr(v)
            if len(text) > 80:
                text = text[:77] + "..."
            rows.append(f"<tr><td>{html.escape(k)}</td><td>{html.escape(text)}</td></tr>")
        params = "<table><thead><tr><th>parameter</th><th>value</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        if not hasattr(self, "bank_"):
            return f"<div class='conceptkit-cbm'><b>{name}</b> (not fitted){params}</div>"
        stats = {
            "features": self.n_features_in_,
            "concepts": self.bank_.n_concepts,
            "classes": len(self.classes_),
            "fit time (s)": f"{self.fit_time_:.3g}",
        }
        srows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in stats.items())
        return (
            f"<div class='conceptkit-cbm'><b>{name}</b> (fitted)<table><tbody>{srows}</tbody></table>"
            f"{self._summary_html()}<details><summary>parameters</summary>{params}</details></div>"
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, str]:
        return {"text/plain": repr(self), "text/html": self._repr_html_()}


class LinearLabelMixin:
    """A head whose logits are linear in the concepts: ``((S - input_mean_) / input_scale_) @ coef_.T + intercept_``.

    Gives exact contributions and a global explanation (:meth:`class_concepts`).
    """

    coef_: Tensor
    intercept_: Tensor
    input_mean_: Tensor
    input_scale_: Tensor

    def _linear_logits(self, S: Tensor) -> Tensor:
        W = self.coef_.to(S.device)
        return ((S - self.input_mean_.to(S.device)) / self.input_scale_.to(S.device)) @ W.T + self.intercept_.to(S.device)

    def _contributions(self, S: Tensor, target: Tensor) -> Tensor:
        base = self._baseline().to(S.device)  # type: ignore[attr-defined]
        W = self.coef_.to(S.device)[target]
        return W * (S - base) / self.input_scale_.to(S.device)

    def class_concepts(self, top: int = 5) -> pd.DataFrame:
        """Global explanation: per class, the concepts with the largest positive weights.

        Returns
        -------
        pd.DataFrame
            ``class``, ``rank``, ``concept``, ``weight`` (per unit of the standardised concept score), and
            ``n_nonzero`` (non-zero weights of the class).
        """
        self._check_fitted()  # type: ignore[attr-defined]
        W = self.coef_.cpu().numpy()
        names = list(self.bank_.names)  # type: ignore[attr-defined]
        rows = []
        for c, cls in enumerate(self.classes_):  # type: ignore[attr-defined]
            order = np.argsort(-W[c], kind="stable")[:top]
            nnz = int((W[c] != 0).sum())
            for r, j in enumerate(order, 1):
                if W[c, j] <= 0:
                    break
                rows.append({"class": cls, "rank": r, "concept": names[j], "weight": float(W[c, j]), "n_nonzero": nnz})
        return pd.DataFrame(rows, columns=["class", "rank", "concept", "weight", "n_nonzero"])

    def _summary_html(self) -> str:
        table = self.class_concepts(top=3)
        if table.empty:
            return ""
        g = table.groupby("class", sort=False)["concept"].apply(lambda s: ", ".join(map(str, s)))
        rows = "".join(f"<tr><td>{html.escape(str(c))}</td><td>{html.escape(v)}</td></tr>" for c, v in g.items())
        return f"<table><thead><tr><th>class</th><th>top concepts</th></tr></thead><tbody>{rows}</tbody></table>"
