"""A concept-supervised CBM on frozen features (Koh et al. 2020): concept predictor + label head.

The bottleneck is the labelled concepts themselves: a concept predictor maps features to concept
probabilities ``S = sigmoid(g(Z)) in [0, 1]^k`` (one logistic output per label column) and a label head
maps ``S`` to the classes. Because the concepts have ground truth, an intervention sets a concept to
exactly 1 or 0 (``concept_on_ = 1``, ``concept_off_ = 0``).

Label head (``label_head``). ConceptWorld classes are a *first-match decision list* of concept
conjunctions (``DEFAULT_RULES``: "red and three or four objects", else "star and stripes", else ...).
A decision list over binary concepts is not linearly separable in general, so the default label head is a
small MLP (one hidden ReLU layer), which represents it exactly once the rule concepts are known; the
classic linear head (``"linear"``) is available for comparison. The head is trained on concept inputs in
which every concept is replaced by its ground truth with probability ``intervention_prob`` (random
training-time interventions, "RandInt" of CEM), so it is accurate both on predicted concepts and after
test-time interventions.

Training (``training``):

``"sequential"`` (default)
    fit the concept predictor (BCE), then the label head on its (detached) predictions mixed with the
    truth as above.
``"independent"``
    the label head sees only ground-truth concepts (``intervention_prob`` is ignored).
``"joint"``
    both together: ``CE + concept_weight * BCE``.

Examples
--------
>>> import numpy as np, pandas as pd
>>> rng = np.random.default_rng(0)
>>> C = pd.DataFrame({"a": rng.random(400) < 0.5, "b": rng.random(400) < 0.5})
>>> X = np.c_[C.to_numpy(float), rng.normal(size=(400, 2))] + rng.normal(scale=0.1, size=(400, 4))
>>> y = (C["a"] ^ C["b"]).to_numpy().astype(int)          # XOR: needs a non-linear label head
>>> head = ConceptBottleneckModel(n_epochs=40).fit(X, y, C)
>>> bool(head.score(X, y) > 0.95)
True
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from concepts.bank import ConceptBank

from .base import ConceptHead, supervised_inputs
from .training import fit_multilabel_logistic, seeded_generator, train_minibatch

logger = logging.getLogger(__name__)

__all__ = ["ConceptBottleneckModel"]

_TRAININGS = ("sequential", "independent", "joint")
_PREDICTORS = ("linear", "mlp")
_HEADS = ("mlp", "linear")


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class ConceptBottleneckModel(ConceptHead):
    """Concept-supervised bottleneck: features -> concept probabilities -> classes.

    Parameters
    ----------
    concept_columns : list of str, optional
        Label columns forming the bottleneck (default: every column of ``concepts`` passed to fit).
    concept_predictor : {"linear", "mlp"}, default="linear"
        ``g``: one logistic regression per concept (solved exactly with L-BFGS unless ``training="joint"``),
        or a one-hidden-layer MLP (trained with Adam).
    concept_l2 : float, default=1e-4
        L2 penalty of the linear concept predictor (per mean BCE, on standardised features).
    label_head : {"mlp", "linear"}, default="mlp"
        See the module docstring (decision lists need ``"mlp"``).
    training : {"sequential", "independent", "joint"}, default="sequential"
    intervention_prob : float, default=0.5
        Probability that a concept input of the label head is replaced by its truth during training.
    concept_weight : float, default=1.0
        Weight of the concept loss in joint training.
    hidden : int, default=128
        Hidden units of the MLPs.
    n_epochs : int, default=60
    batch_size : int, default=256
    lr : float, default=3e-3
        Adam learning rate.
    weight_decay : float, default=1e-4
    encoder : object, optional
        Image encoder (``encode_images``) so that ``X`` may be images.
    device : str, default="cpu"
    random_state : int, default=0
        Seeds the initialisation, batch order and training-time interventions.
    verbose : bool, default=False

    Attributes
    ----------
    bank_ : ConceptBank
        The labelled concepts; vectors are the predictor's directions in feature space (linear predictor)
        or class-mean differences (MLP predictor).
    predictor_, head_ : torch.nn.Module
    history_ : dict
        Mean training loss per epoch of each mini-batch stage (``"label"``; ``"concepts"`` for an MLP
        predictor; ``"joint"``).

    Examples
    --------
    >>> ConceptBottleneckModel(label_head="linear").get_params()["label_head"]
    'linear'
    """

    _requires_concepts = True

    def __init__(
        self,
        concept_columns: Sequence[str] | None = None,
        concept_predictor: str = "linear",
        concept_l2: float = 1e-4,
        label_head: str = "mlp",
        training: str = "sequential",
        intervention_prob: float = 0.5,
        concept_weight: float = 1.0,
        hidden: int = 128,
        n_epochs: int = 60,
        batch_size: int = 256,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        encoder: Any = None,
        device: str = "cpu",
        random_state: int | None = 0,
        verbose: bool = False,
    ) -> None:
        self.concept_columns = concept_columns
        self.concept_predictor = concept_predictor
        self.concept_l2 = concept_l2
        self.label_head = label_head
        self.training = training
        self.intervention_prob = intervention_prob
        self.concept_weight = concept_weight
        self.hidden = hidden
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.encoder = encoder
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _validate_params(self) -> None:
        if self.training not in _TRAININGS:
            raise ValueError(f"training must be one of {_TRAININGS}; got {self.training!r}.")
        if self.concept_predictor not in _PREDICTORS:
            raise ValueError(f"concept_predictor must be one of {_PREDICTORS}; got {self.concept_predictor!r}.")
        if self.label_head not in _HEADS:
            raise ValueError(f"label_head must be one of {_HEADS}; got {self.label_head!r}.")
        p = self.intervention_prob
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
            raise ValueError(f"intervention_prob must be a probability in [0, 1]; got {p!r}.")
        for name in ("hidden", "n_epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        for name, strict in (("lr", True), ("weight_decay", False), ("concept_weight", False), ("concept_l2", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v > 0 if strict else v >= 0):
                raise ValueError(f"{name} must be a number {'>' if strict else '>='} 0; got {v!r}.")

    def _fit(self, Z: Tensor, y: Tensor, C: pd.DataFrame | None) -> None:
        cols, T, Zs = supervised_inputs(self, Z, C)
        dev = Z.device
        n, d = Z.shape
        k, K = len(cols), len(self.classes_)
        pos = T.mean(0).clamp(1e-3, 1 - 1e-3)
        predictor = (nn.Linear(d, k) if self.concept_predictor == "linear" else _mlp(d, self.hidden, k)).to(dev)
        with torch.no_grad():  # start at the concept base rates
            last = predictor if isinstance(predictor, nn.Linear) else predictor[-1]
            last.bias.copy_(torch.log(pos / (1 - pos)))
        head = (nn.Linear(k, K) if self.label_head == "linear" else _mlp(k, self.hidden, K)).to(dev)
        gen = seeded_generator(self._seed + 7, dev)
        p_int = 1.0 if self.training == "independent" else float(self.intervention_prob)
        bce = nn.BCEWithLogitsLoss()

        def mixed(S: Tensor, idx: Tensor) -> Tensor:
            if p_int <= 0:
                return S
            swap = torch.rand(S.shape, generator=gen, device=dev) < p_int
            return torch.where(swap, T[idx], S)

        self.history_ = {}
        if self.training != "joint" and isinstance(predictor, nn.Linear):
            # one logistic regression per concept, solved exactly (full batch, L-BFGS)
            W, b = fit_multilabel_logistic(Zs, T, l2=float(self.concept_l2), init_bias=torch.log(pos / (1 - pos)))
            with torch.no_grad():
                predictor.weight.copy_(W)
                predictor.bias.copy_(b)
        common = dict(n_epochs=self.n_epochs, batch_size=self.batch_size, lr=self.lr, device=dev,
                      weight_decay=self.weight_decay, progress=self.verbose)
        if self.training == "joint":
            def joint_loss(idx: Tensor) -> Tensor:
                logit_c = predictor(Zs[idx])
                S = torch.sigmoid(logit_c)
                ce = nn.functional.cross_entropy(head(mixed(S, idx)), y[idx])
                return ce + self.concept_weight * bce(logit_c, T[idx])

            self.history_["joint"] = train_minibatch(
                joint_loss, list(predictor.parameters()) + list(head.parameters()), n, seed=self._seed,
                desc="CBM (joint)", **common)
        else:
            if not isinstance(predictor, nn.Linear):
                self.history_["concepts"] = train_minibatch(
                    lambda idx: bce(predictor(Zs[idx]), T[idx]), list(predictor.parameters()), n, seed=self._seed,
                    desc="CBM concepts", **common)
            with torch.no_grad():
                S_all = torch.sigmoid(predictor(Zs))
            self.history_["label"] = train_minibatch(
                lambda idx: nn.functional.cross_entropy(head(mixed(S_all[idx], idx)), y[idx]),
                list(head.parameters()), n, seed=self._seed + 1, desc="CBM label head", **common)
        self.predictor_ = predictor.eval()
        self.head_ = head.eval()
        if isinstance(predictor, nn.Linear):
            vectors = (predictor.weight.detach() / self.input_scale_.to(dev)[None, :]).cpu()
            self.bank_ = ConceptBank(vectors, names=cols, metadata={"how": "cbm-predictor", "predictor": "linear"})
        else:
            self.bank_ = ConceptBank.from_cavs(Z.cpu(), C[cols], method="mean_difference",
                                               metadata={"predictor": "mlp"})

    def _scores(self, Z: Tensor) -> Tensor:
        Zs = (Z - self.input_mean_.to(Z.device)) / self.input_scale_.to(Z.device)
        return torch.sigmoid(self.predictor_(Zs))

    def _logits(self, S: Tensor) -> Tensor:
        return self.head_(S)

    def _on_off(self) -> tuple[np.ndarray, np.ndarray]:
        k = self.bank_.n_concepts
        return np.ones(k), np.zeros(k)

    def _summary_html(self) -> str:
        return (f"<p>concept predictor: {self.concept_predictor}; label head: {self.label_head}; "
                f"training: {self.training}</p>")
