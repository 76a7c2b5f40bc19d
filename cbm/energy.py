"""Energy-based concept bottleneck model (ECBM, Xu et al., ICLR 2024) on frozen features.

Three energy networks score compatibilities (low energy = compatible):

* **concept energy** ``E_k(x, s)`` for concept ``k`` in state ``s in {0, 1}``: a one-hidden-layer network
  of the features with ``2k`` outputs; its Boltzmann distribution ``p(c_k = 1 | x) = sigmoid(E_k(x, 0) -
  E_k(x, 1))`` is the per-concept evidence;
* **class energy** ``E_class(x, m)``: a one-hidden-layer network with one output per class;
* **global (concept-class) energy** ``E_global(c, m) = -log p(c) - log p(y = m | c)``, i.e. ``-log p(c, y)``
  up to a constant: a class network over the concept vector (``p(y | c) = softmax(f(c))``, one hidden ReLU
  layer: ECBM's concept-class energy) plus a concept-prior energy ``-log p(c) = -b.c - sum_j softplus(W_j.c
  + a_j)`` (a restricted Boltzmann machine's free energy with ``prior_hidden`` hidden units).

Choices, where we differ from ECBM. ECBM writes each energy as ``w . ReLU(h + h * u_m)`` with a unit-norm
embedding ``u_m``; since ``1 + u_m >= 0`` elementwise this equals ``ReLU(h) . (w * (1 + u_m))``, a linear
read-out of one hidden layer, which we parametrise directly (a free matrix containing the paper's form).
ECBM's global energy is trained only through the class cross-entropy: that identifies ``p(y | c)`` but
not how the concepts co-occur, so at inference nothing ties one concept to another except through the
class, and its reference code computes conditional probabilities by counting predictions. The concept-prior
energy (our addition) is what couples correlated concepts during inference and interventions, and with it
``exp(-E_global)`` is a joint distribution from which ``p(c_k | y)``, ``p(c_k | c_j)`` and the joint
probabilities are computed (:meth:`EnergyCBM.conditional_probabilities`). It is a product of experts
(each hidden unit adds a soft constraint), which stays smooth at relaxed concepts ``p in [0, 1]^k`` and
lets a clamped concept push every correlated concept at once; a mixture prior, tried first, made the
relaxed inference collapse onto one prototype and ignore clamps. It is trained by pseudo-likelihood
(``sum_k -log p(c_k | c_-k)``, consistent and cheap; the partition function is only needed for the
probability tables, where it is summed exactly over the ``2^k`` concept vectors or sampled).

Training (on concept labels and classes), with ``loss_weights = (concept, class, global)``, default
``(1, 3, 1)`` as in ECBM's configs:

* concept loss: ``sum_k`` cross-entropy of ``c_k`` under ``softmax_s(-E_k(x, s))``;
* class loss: cross-entropy of ``y`` under ``softmax_m(-E_class(x, m))``;
* global loss: ECBM's cross-entropy of ``y`` under ``softmax_m(-E_global(c~, m))`` (i.e. of ``p(y | c~)``),
  where ``c~`` is the concept vector with the flip augmentation (for a random ``flip_fraction`` of the
  samples, each concept is flipped with probability ``flip_prob``), plus the prior's negative
  pseudo-log-likelihood ``sum_k -log p(c_k | c_-k)`` of the clean concept labels.

Inference (``concept_scores``, ``predict_proba``) minimises, per sample and batched, a mean-field free
energy over relaxed concepts ``p in [0, 1]^k`` (``p = sigmoid(a)``) and a relaxed class ``q``
(``q = softmax(b)``), with ``inference_weights = (w_c, w_y, w_g)`` and temperature ``T``::

    F(p, q) = w_c sum_k [p_k E_k(x, 1) + (1 - p_k) E_k(x, 0)] + w_y sum_m q_m E_class(x, m)
              + w_g sum_m q_m E_{c ~ p}[E_global(c, m)] - T [sum_k H(p_k) + H(q)]

by gradient steps on the logits: ``a <- a - eta dF/dp`` and ``b <- b - eta dF/dq`` (mirror descent, the
natural gradient of the relaxation; plain gradient descent on the logits stalls wherever a sigmoid is
saturated). The gradient of the expected global energy, ``E_{c ~ p}[E_global(c with c_k = 1) -
E_global(c with c_k = 0)]``, is evaluated with the other concepts at their means (exact for energies
linear in each concept). Because it compares the two states of a concept rather than taking a slope at
the relaxed point, a strong constraint (two counts cannot both be true) acts even when a concept sits
at 0 or 1. With ``w_g = 0`` the optimum is the per-concept evidence ``p_k = sigmoid(w_c (E_k(x, 0) -
E_k(x, 1)) / T)``; a small ``T`` approaches ECBM's energy-only relaxation (a joint mode). Inference
starts at the per-concept evidence, runs batched, and stops when no concept probability of any sample
has moved by more than ``tol`` for ``patience`` steps, or after ``max_steps`` steps. The class is read
out from the inferred concepts through the global energy, ``p(y | c) = softmax(f(c))``, so it depends on
the input only through the concepts (a bottleneck); a positive ``w_y`` lets the class energy of the
input shape the concept inference.

Interventions clamp the intervened concepts to their values and re-optimise the free energy over the
remaining concepts and the class with all energies active (no hard threshold), restarting from the
per-concept evidence, so a correction propagates to correlated concepts (:meth:`EnergyCBM.intervene`,
:meth:`EnergyCBM.intervened_concepts`). ECBM's released code instead thresholds the concepts inside the
global energy and re-optimises the class only, so a correction never reaches the other concepts
(``propagate=False``). From concept scores alone (:meth:`~cbm.base.ConceptHead.predict_proba_from_concepts`
with an intervention mask, hence :func:`cbm.interventions.intervention_curve` and
:func:`cbm.metrics.evaluate`) the head re-infers too: at a fixed point of the inference the evidence is
``w_c (E_k(x, 0) - E_k(x, 1)) = T logit(p_k) + w_g sum_m q_m Delta_k E_global(p, m)``, so it is recovered
from the scores; the values the intervened concepts had before the edit are not in the edited scores, so
they are first re-inferred from the other concepts with no evidence of their own (an approximation; the
methods that take ``X`` use the exact evidence).

Conditional probabilities come from ``p(c, y) ∝ exp(-E_global(c, y))``: :meth:`EnergyCBM.conditional_probabilities`
(``p(c_k | y)``, ``p(c_k | c_j)``, ``p(c_k | not c_j)``, ``p(y, c_k)``, ``p(y)``;
exact sums over the ``2^k`` concept vectors when ``k <= exact_max_concepts``, otherwise Gibbs samples of
the prior weighted by ``p(y | c)``) and :meth:`EnergyCBM.top_configurations` (the most probable concept
vectors of each class); :func:`empirical_conditionals` counts the same tables from labelled data,
:func:`conditional_mae` compares two tables and :func:`plot_conditionals` draws one as a heatmap.

Examples
--------
>>> import numpy as np, pandas as pd
>>> rng = np.random.default_rng(0)
>>> a = rng.random(600) < 0.5
>>> C = pd.DataFrame({"a": a, "b": a ^ (rng.random(600) < 0.05)})     # b copies a 95% of the time
>>> X = C.to_numpy(float) + rng.normal(scale=0.6, size=(600, 2))
>>> y = C["a"].to_numpy().astype(int)
>>> head = EnergyCBM(n_epochs=60, hidden=32, global_hidden=16, prior_hidden=4).fit(X, y, C)
>>> table = head.conditional_probabilities("concept|concept")
>>> bool(table.loc["a", "b"] > 0.85)                                 # p(b = 1 | a = 1) from the energy
True
"""
from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from concepts.bank import ConceptBank

from .base import ConceptHead, as_concept_frame, supervised_inputs
from .concept_sets import class_texts
from .training import seeded_generator, train_minibatch

logger = logging.getLogger(__name__)

__all__ = ["EnergyCBM", "empirical_conditionals", "conditional_mae", "plot_conditionals", "CONDITIONAL_KINDS"]

CONDITIONAL_KINDS = ("concept|class", "concept|concept", "concept|not concept", "joint", "class")
"""Tables of :meth:`EnergyCBM.conditional_probabilities` and :func:`empirical_conditionals`."""

_STATE_CHUNK = 8192
_GIBBS_MERGE_ROWS = 200_000  # visited states buffered before they are merged into the distinct-state table
_P_CLIP = 1e-6


class _Energies(nn.Module):
    """The three energy networks (see the module docstring)."""

    def __init__(self, d: int, k: int, m: int, hidden: int, global_hidden: int, prior_hidden: int,
                 dropout: float) -> None:
        super().__init__()
        self.k, self.m = k, m
        self.concept_net = nn.Sequential(nn.Linear(d, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, 2 * k))
        self.class_net = nn.Sequential(nn.Linear(d, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, m))
        self.label_net = nn.Sequential(nn.Linear(k, global_hidden), nn.ReLU(), nn.Linear(global_hidden, m))
        self.prior_in = nn.Linear(k, prior_hidden)
        self.prior_bias = nn.Parameter(torch.zeros(k))
        with torch.no_grad():
            self.prior_in.weight.mul_(0.1)

    def concept_energies(self, z: Tensor) -> Tensor:
        """``[n, k, 2]``: ``E_k(x, s)``."""
        return self.concept_net(z).view(z.shape[0], self.k, 2)

    def class_energies(self, z: Tensor) -> Tensor:
        """``[n, m]``: ``E_class(x, m)``."""
        return self.class_net(z)

    def prior_energy(self, c: Tensor) -> Tensor:
        """``[n]``: unnormalised ``-log p(c) = -b.c - sum_j softplus(W_j.c + a_j)`` (binary or relaxed ``c``)."""
        return -(c @ self.prior_bias) - nn.functional.softplus(self.prior_in(c)).sum(-1)

    def prior_pseudo_nll(self, c: Tensor) -> Tensor:
        """``[n]``: ``-sum_k log p(c_k | c_-k)`` under the prior (its pseudo-likelihood)."""
        e = self.prior_in(c)                                            # [n, H]
        sign = 1.0 - 2.0 * c                                            # flips 0 -> 1 and 1 -> 0
        e_flip = e[:, None, :] + sign[:, :, None] * self.prior_in.weight.T[None]   # [n, k, H]
        # F(flipped) - F(c) for each k
        delta = -(sign * self.prior_bias) - (nn.functional.softplus(e_flip) - nn.functional.softplus(e)[:, None, :]).sum(-1)
        return nn.functional.softplus(-delta).sum(1)

    def label_log_proba(self, c: Tensor) -> Tensor:
        """``[n, m]``: ``log p(y = m | c)``."""
        return torch.log_softmax(self.label_net(c), dim=1)

    def global_energies(self, c: Tensor) -> Tensor:
        """``[n, m]``: ``E_global(c, m) = -log p(c) - log p(y = m | c)`` (up to the prior's ``log Z``)."""
        return self.prior_energy(c)[:, None] - self.label_log_proba(c)

    def flip_differences(self, p: Tensor) -> Tensor:
        """``[n, k, m]``: ``E_global(p with p_k = 1, m) - E_global(p with p_k = 0, m)`` at relaxed ``p [n, k]``."""
        up, down = (1.0 - p)[:, :, None], -p[:, :, None]
        Wp = self.prior_in.weight.T[None]                                       # [1, k, H]
        e = self.prior_in(p)[:, None, :]
        prior = -self.prior_bias - (nn.functional.softplus(e + up * Wp) - nn.functional.softplus(e + down * Wp)).sum(-1)
        first, out = self.label_net[0], self.label_net[2]
        Wl = first.weight.T[None]                                               # [1, k, G]
        h = first(p)[:, None, :]
        lp1 = torch.log_softmax(out(torch.relu(h + up * Wl)), dim=-1)
        lp0 = torch.log_softmax(out(torch.relu(h + down * Wl)), dim=-1)
        return prior[:, :, None] - (lp1 - lp0)

    def gibbs(self, c: Tensor, sweeps: int, generator: torch.Generator) -> Tensor:
        """``sweeps`` block-Gibbs sweeps (hidden given concepts, concepts given hidden) of the prior."""
        W = self.prior_in.weight
        for _ in range(sweeps):
            h = (torch.rand(c.shape[0], W.shape[0], generator=generator, device=c.device)
                 < torch.sigmoid(self.prior_in(c))).to(c.dtype)
            c = (torch.rand(c.shape, generator=generator, device=c.device)
                 < torch.sigmoid(self.prior_bias + h @ W)).to(c.dtype)
        return c


def _merge_states(keys: list[np.ndarray], sums: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct packed states ``[u, bytes]`` with their summed weights ``[u, m]`` (rows of equal keys added)."""
    allk = np.concatenate(keys)
    alls = np.concatenate(sums)
    if len(allk) == 0:
        return allk, alls
    uniq, inverse = np.unique(allk, axis=0, return_inverse=True)
    out = np.zeros((len(uniq), alls.shape[1]))
    np.add.at(out, inverse.ravel(), alls)
    return uniq, out


def _check_weights(value: Any, name: str, *, first_positive: bool = False) -> tuple[float, float, float]:
    try:
        w = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be three numbers (concept, class, global); got {value!r}.") from None
    if len(w) != 3 or not all(math.isfinite(v) and v >= 0 for v in w):
        raise ValueError(f"{name} must be three finite numbers >= 0 (concept, class, global); got {value!r}.")
    if first_positive and w[0] <= 0:
        raise ValueError(
            f"{name}[0] (the concept energy's weight) must be > 0, otherwise nothing ties the concepts to the "
            f"input; got {value!r}."
        )
    return w  # type: ignore[return-value]


class EnergyCBM(ConceptHead):
    """Energy-based concept bottleneck model (ECBM) on frozen features.

    See the module docstring for the energies, the training objective, inference and interventions.

    Parameters
    ----------
    concept_columns : list of str, optional
        Label columns forming the bottleneck (default: every column of ``concepts`` passed to fit).
    hidden : int, default=128
        Hidden units of the concept and class energy networks (ECBM uses 512 on ResNet features).
    global_hidden : int, default=128
        Hidden units of the global energy's class network ``p(y | c)``.
    prior_hidden : int, default=64
        Hidden units of the concept prior ``p(c)`` (a restricted Boltzmann machine).
    dropout : float, default=0.2
        Dropout on the hidden layers of the concept and class networks (training only).
    loss_weights : (float, float, float), default=(1.0, 3.0, 1.0)
        Weights of the concept, class and global losses (ECBM's ``lambda_xc, lambda_xy, lambda_cy``).
    flip_fraction : float, default=0.2
        Fraction of the samples whose concepts are perturbed for the global energy's class loss.
    flip_prob : float, default=0.2
        Probability that a concept of a perturbed sample is flipped.
    n_epochs : int, default=100
    batch_size : int, default=256
    lr : float, default=3e-3
        Adam learning rate of the networks (ECBM trains end to end with SGD 0.01; on frozen features Adam
        converges in far fewer epochs).
    prior_lr : float, default=0.03
        Adam learning rate of the concept prior.
    weight_decay : float, default=1e-4
        Adam weight decay of the networks (not of the prior).
    inference_weights : (float, float, float), default=(1.0, 0.0, 1.0)
        ``(w_c, w_y, w_g)`` of the free energy minimised at inference (module docstring); ``w_c > 0``.
    temperature : float, default=1.0
        Entropy weight ``T > 0`` of the free energy (small: close to ECBM's energy-only relaxation).
    inference_lr : float, default=0.5
        Step size ``eta`` of the inference (``eta T = 1`` is the undamped mean-field update).
    max_steps : int, default=200
        Cap on the inference steps per batch.
    patience : int, default=5
        Stop when no concept probability has moved by more than ``tol`` for this many steps.
    tol : float, default=1e-3
        Largest change of a concept probability per step that counts as converged.
    exact_max_concepts : int, default=20
        :meth:`conditional_probabilities` and :meth:`top_configurations` sum over all ``2^k`` concept
        vectors up to this many concepts and use Gibbs sampling above.
    n_chains : int, default=1000
        Gibbs chains (above ``exact_max_concepts``).
    n_sweeps : int, default=1000
        Gibbs sweeps per chain; the first third is burn-in, every later sweep is kept. Block Gibbs on the
        prior mixes slowly when concepts are strongly coupled (e.g. mutually exclusive counts): a few hundred
        sweeps leave a burn-in bias of several points in ``p(c_k | y)``; 1000 keep it to about 0.02-0.04.
    encoder : object, optional
        Image encoder (``encode_images``) so that ``X`` may be images.
    device : str, default="cpu"
    random_state : int, default=0
        Seeds the initialisation, batch order, flip augmentation and sampling.
    verbose : bool, default=False

    Attributes
    ----------
    bank_ : ConceptBank
        The labelled concepts (vectors: mean differences of the features of positives and negatives).
    energies_ : torch.nn.Module
        The three energy networks (frozen, in eval mode).
    input_mean_, input_scale_ : Tensor [d]
        Feature standardisation.
    concept_prevalence_ : ndarray [k]
        Training frequency of each concept.
    history_ : dict
        ``"loss"``: mean training loss per epoch.
    n_inference_steps_ : int
        Steps taken by the most recent inference batch (at most ``max_steps``; diagnostics).

    Examples
    --------
    >>> EnergyCBM(inference_weights=(1.0, 1.0, 1.0)).get_params()["inference_weights"]
    (1.0, 1.0, 1.0)
    """

    _requires_concepts = True

    def __init__(
        self,
        concept_columns: Sequence[str] | None = None,
        hidden: int = 128,
        global_hidden: int = 128,
        prior_hidden: int = 64,
        dropout: float = 0.2,
        loss_weights: tuple[float, float, float] = (1.0, 3.0, 1.0),
        flip_fraction: float = 0.2,
        flip_prob: float = 0.2,
        n_epochs: int = 100,
        batch_size: int = 256,
        lr: float = 3e-3,
        prior_lr: float = 0.03,
        weight_decay: float = 1e-4,
        inference_weights: tuple[float, float, float] = (1.0, 0.0, 1.0),
        temperature: float = 1.0,
        inference_lr: float = 0.5,
        max_steps: int = 200,
        patience: int = 5,
        tol: float = 1e-3,
        exact_max_concepts: int = 20,
        n_chains: int = 1000,
        n_sweeps: int = 1000,
        encoder: Any = None,
        device: str = "cpu",
        random_state: int | None = 0,
        verbose: bool = False,
    ) -> None:
        self.concept_columns = concept_columns
        self.hidden = hidden
        self.global_hidden = global_hidden
        self.prior_hidden = prior_hidden
        self.dropout = dropout
        self.loss_weights = loss_weights
        self.flip_fraction = flip_fraction
        self.flip_prob = flip_prob
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.prior_lr = prior_lr
        self.weight_decay = weight_decay
        self.inference_weights = inference_weights
        self.temperature = temperature
        self.inference_lr = inference_lr
        self.max_steps = max_steps
        self.patience = patience
        self.tol = tol
        self.exact_max_concepts = exact_max_concepts
        self.n_chains = n_chains
        self.n_sweeps = n_sweeps
        self.encoder = encoder
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ validation
    def _validate_params(self) -> None:
        for name in ("hidden", "global_hidden", "prior_hidden", "n_epochs", "batch_size", "max_steps", "patience",
                     "n_chains", "n_sweeps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        v = self.exact_max_concepts
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= 26:
            raise ValueError(
                f"exact_max_concepts must be an integer in [0, 26] (exact sums visit 2^k concept vectors); got {v!r}."
            )
        for name in ("dropout", "flip_fraction", "flip_prob"):
            v = getattr(self, name)
            upper_ok = (v < 1) if name == "dropout" else (v <= 1)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v >= 0 and upper_ok):
                raise ValueError(f"{name} must be a probability in [0, 1{')' if name == 'dropout' else ']'}; got {v!r}.")
        for name, strict in (("lr", True), ("prior_lr", True), ("inference_lr", True), ("weight_decay", False),
                             ("temperature", True), ("tol", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not (
                    v > 0 if strict else v >= 0):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0; got {v!r}.")
        _check_weights(self.loss_weights, "loss_weights")
        _check_weights(self.inference_weights, "inference_weights", first_positive=True)

    # ------------------------------------------------------------------ training
    def _fit(self, Z: Tensor, y: Tensor, C: pd.DataFrame | None) -> None:
        cols, T, Zs = supervised_inputs(self, Z, C)
        dev = Z.device
        n, d = Z.shape
        k, m = len(cols), len(self.classes_)
        net = _Energies(d, k, m, int(self.hidden), int(self.global_hidden), int(self.prior_hidden),
                        float(self.dropout)).to(dev)
        gen = seeded_generator(self._seed + 11, dev)
        with torch.no_grad():
            # concept energies start at the base rates: E_k(x, 1) - E_k(x, 0) = -logit(prevalence)
            pos = T.mean(0).clamp(1e-3, 1 - 1e-3)
            bias = net.concept_net[-1].bias.view(k, 2)
            bias.zero_()
            bias[:, 1] = -torch.log(pos / (1 - pos))
            net.prior_bias.copy_(torch.log(pos / (1 - pos)))              # the prior starts independent
        wc, wy, wg = _check_weights(self.loss_weights, "loss_weights")
        frac, fprob = float(self.flip_fraction), float(self.flip_prob)
        bce = nn.functional.binary_cross_entropy_with_logits

        def loss_fn(idx: Tensor) -> Tensor:
            z, c, t = Zs[idx], T[idx], y[idx]
            E = net.concept_energies(z)
            loss = wc * bce(E[..., 0] - E[..., 1], c, reduction="none").sum(1).mean()
            if wy:
                loss = loss + wy * nn.functional.cross_entropy(-net.class_energies(z), t)
            if wg:
                c_aug = c
                if frac > 0 and fprob > 0:
                    flip_rows = torch.rand(len(idx), 1, generator=gen, device=dev) < frac
                    flips = torch.rand(c.shape, generator=gen, device=dev) < fprob
                    c_aug = torch.where(flip_rows & flips, 1.0 - c, c)
                class_term = nn.functional.nll_loss(net.label_log_proba(c_aug), t)
                loss = loss + wg * (class_term + net.prior_pseudo_nll(c).mean())
            return loss

        networks = list(net.concept_net.parameters()) + list(net.class_net.parameters()) + list(net.label_net.parameters())
        groups = [{"params": networks},
                  {"params": list(net.prior_in.parameters()) + [net.prior_bias], "lr": float(self.prior_lr),
                   "weight_decay": 0.0}]
        net.train()
        self.history_ = {"loss": train_minibatch(
            loss_fn, groups, n, n_epochs=int(self.n_epochs), batch_size=int(self.batch_size), lr=float(self.lr),
            seed=self._seed, device=dev, weight_decay=float(self.weight_decay), progress=bool(self.verbose),
            desc="EnergyCBM")}
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.energies_ = net
        self.concept_prevalence_ = T.mean(0).cpu().numpy().astype(np.float64)
        self.bank_ = ConceptBank.from_cavs(Z.cpu(), C[cols], method="mean_difference",
                                           metadata={"how": "energy-cbm", "head": "EnergyCBM"})

    # ------------------------------------------------------------------ inference
    def _standardise(self, Z: Tensor) -> Tensor:
        return (Z - self.input_mean_.to(Z.device)) / self.input_scale_.to(Z.device)

    def _evidence_of(self, Z: Tensor) -> tuple[Tensor, Tensor]:
        """Per-concept log-odds ``E_k(x, 0) - E_k(x, 1)`` ``[n, k]`` and class energies ``[n, m]``."""
        z = self._standardise(Z)
        E = self.energies_.concept_energies(z)
        return E[..., 0] - E[..., 1], self.energies_.class_energies(z)

    def _infer(
        self,
        evidence: Tensor,
        class_energy: Tensor | None,
        init: Tensor,
        mask: Tensor | None = None,
        values: Tensor | None = None,
    ) -> Tensor:
        """Minimise the free energy over the free concepts and the class; returns concept probabilities ``[n, k]``.

        ``evidence``: per-concept log-odds ``[n, k]``; ``class_energy``: ``[n, m]`` (None: not used);
        ``init``: starting concept logits ``[n, k]``; ``mask``/``values``: clamped concepts and their values.
        """
        wc, wy, wg = _check_weights(self.inference_weights, "inference_weights", first_positive=True)
        T = float(self.temperature)
        net = self.energies_
        n, k = evidence.shape
        if mask is None or values is None:
            mask = torch.zeros(n, k, dtype=torch.bool, device=evidence.device)
            values = torch.zeros(n, k, device=evidence.device)
        free = ~mask
        if n == 0 or not wg:  # nothing couples the concepts: the optimum is the per-concept evidence
            return torch.where(mask, values, torch.sigmoid(wc * evidence / T))
        use_class = class_energy is not None and wy > 0
        eta = float(self.inference_lr)
        a = init.detach().clone()
        p = torch.where(mask, values, torch.sigmoid(a))
        stale, steps = 0, 0
        for steps in range(1, int(self.max_steps) + 1):
            # class: mirror-descent step on its logits (its exact optimum when eta * T = 1)
            lin = -wg * net.global_energies(p)
            if use_class:
                lin = lin - wy * class_energy
            q = torch.softmax(lin / T, dim=1)
            # concepts: mirror-descent step along the gradient of the expected free energy
            grad = -wc * evidence + wg * (net.flip_differences(p) * q[:, None, :]).sum(-1)
            a = torch.where(mask, a, (1.0 - eta * T) * a - eta * grad)
            p_new = torch.where(mask, values, torch.sigmoid(a))
            change = float((p_new - p).abs().max()) if p.numel() else 0.0
            p = p_new
            stale = stale + 1 if change < float(self.tol) else 0
            if stale >= int(self.patience):
                break
        self.n_inference_steps_ = steps
        return p

    def _scores(self, Z: Tensor) -> Tensor:
        evidence, class_energy = self._evidence_of(Z)
        wc = float(self.inference_weights[0])
        return self._infer(evidence, class_energy, evidence * wc / float(self.temperature))

    def _logits(self, S: Tensor) -> Tensor:
        return self.energies_.label_log_proba(S)

    def _recover_evidence(self, S: Tensor) -> Tensor:
        """The per-concept evidence for which ``S`` is a fixed point of the inference (with ``w_y = 0``)."""
        wc, _, wg = _check_weights(self.inference_weights, "inference_weights", first_positive=True)
        T = float(self.temperature)
        p = S.clamp(_P_CLIP, 1 - _P_CLIP)
        logit = torch.log(p) - torch.log1p(-p)
        if not wg:
            return T * logit / wc
        net = self.energies_
        lin = -wg * net.global_energies(p)
        q = torch.softmax(lin / T, dim=1)
        return (T * logit + wg * (net.flip_differences(p) * q[:, None, :]).sum(-1)) / wc

    def _reinfer(self, S: Tensor, mask: Tensor, Z: Tensor | None = None) -> Tensor:
        """Concepts after clamping ``S[mask]`` and re-optimising the others (rows without a clamp unchanged).

        With the features ``Z`` the evidence is exact and the inference restarts from it with the clamps
        applied (an intervention is conditioning: the result does not depend on the pre-intervention
        solution). Without them it is recovered from the scores: the values the intervened concepts had
        before are unknown, so they are first re-inferred from the other concepts with no evidence of their
        own, the other concepts' evidence is recovered at that point, and the inference starts there.
        """
        rows = mask.any(1)
        out = S.clone()
        if not bool(rows.any()):
            return out
        Sr, Mr = S[rows], mask[rows]
        values = Sr.clamp(0.0, 1.0)
        if Z is not None:
            # a fresh inference with the clamps (from the per-concept evidence, as _scores starts): starting
            # from the pre-intervention solution tends to keep its other beliefs (e.g. the count) and move
            # the weakly evidenced partner instead (measured: fewer partners fixed, more broken)
            evidence, class_energy = self._evidence_of(Z[rows])
            init = evidence * float(self.inference_weights[0]) / float(self.temperature)
        else:
            before = self._infer(torch.zeros_like(Sr), None, torch.zeros_like(Sr), ~Mr, values)
            evidence, class_energy = self._recover_evidence(before), None
            p = before.clamp(_P_CLIP, 1 - _P_CLIP)
            init = torch.log(p) - torch.log1p(-p)
        out[rows] = self._infer(evidence, class_energy, init, Mr, values)
        return out

    def _intervened_logits(self, S: Tensor, intervened: Tensor) -> Tensor:
        return self._logits(self._reinfer(S, intervened))

    def intervene(
        self,
        X: Any,
        interventions: Mapping[str | int, Any] | Sequence[str | int],
        *,
        concepts: pd.DataFrame | None = None,
    ) -> np.ndarray:
        """Class probabilities ``[n, K]`` after setting concepts, with the other concepts re-inferred.

        As :meth:`~cbm.base.ConceptHead.intervene`; the non-intervened concepts and the class are
        re-optimised with every energy active and the exact evidence of the input
        (:meth:`intervened_concepts` returns the concepts).
        """
        p = self._intervened_tensor(X, interventions, concepts)
        with torch.no_grad():
            return torch.softmax(self._logits(p).double(), dim=1).cpu().numpy()

    def _intervened_tensor(self, X: Any, interventions: Any, concepts: pd.DataFrame | None) -> Tensor:
        self._check_fitted()
        Z = self._features(X)
        S, mask = self._apply_interventions(Z, interventions, concepts)
        St = self._as_scores(S)
        M = torch.as_tensor(mask, device=St.device)
        with torch.no_grad():
            return torch.cat([self._reinfer(St[i:i + _STATE_CHUNK], M[i:i + _STATE_CHUNK], Z[i:i + _STATE_CHUNK])
                              for i in range(0, len(St), _STATE_CHUNK)])

    def _on_off(self) -> tuple[np.ndarray, np.ndarray]:
        k = self.bank_.n_concepts
        return np.ones(k), np.zeros(k)

    def concept_evidence(self, X: Any) -> np.ndarray:
        """Per-concept evidence ``sigmoid(E_k(x, 0) - E_k(x, 1))`` ``[n, k]`` (no joint inference).

        The concept energies' own predictions, i.e. what independent concept predictors would say;
        :meth:`concept_scores` are the jointly inferred concepts.

        Examples
        --------
        >>> import numpy as np, pandas as pd
        >>> C = pd.DataFrame({"a": [True, False] * 50})
        >>> head = EnergyCBM(n_epochs=50, hidden=8, global_hidden=4, prior_hidden=2).fit(
        ...     C.to_numpy(float), [1, 0] * 50, C)
        >>> (head.concept_evidence(np.array([[1.0], [0.0]]))[:, 0] > 0.5).tolist()
        [True, False]
        """
        self._check_fitted()
        Z = self._features(X)
        with torch.no_grad():
            return self._chunked(lambda z: torch.sigmoid(self._evidence_of(z)[0]), Z).cpu().numpy()

    def intervened_concepts(
        self,
        X: Any,
        interventions: Mapping[str | int, Any] | Sequence[str | int],
        *,
        concepts: pd.DataFrame | None = None,
        propagate: bool = True,
    ) -> np.ndarray:
        """Concept probabilities ``[n, k]`` after an intervention, with the other concepts re-inferred.

        Parameters
        ----------
        X
            Features or images.
        interventions
            As in :meth:`~cbm.base.ConceptHead.intervene` (``{concept: value}`` or a list of concepts set to
            their ground truth).
        concepts
            Ground-truth labels, needed for ``"truth"``.
        propagate
            False: only the intervened concepts change (what ECBM's reference code does to the concepts).

        Returns
        -------
        ndarray
            ``[n, k]`` concept probabilities (intervened entries hold their set values).

        Examples
        --------
        >>> import numpy as np, pandas as pd
        >>> rng = np.random.default_rng(0)
        >>> a = rng.random(400) < 0.5
        >>> C = pd.DataFrame({"a": a, "b": a})                          # b always equals a
        >>> X = np.c_[C["a"] + rng.normal(scale=0.3, size=400), C["b"] + rng.normal(scale=3.0, size=400)]
        >>> head = EnergyCBM(n_epochs=30, hidden=16, global_hidden=8, prior_hidden=4).fit(X, a.astype(int), C)
        >>> after = head.intervened_concepts(X, ["a"], concepts=C)
        >>> bool(((after[:, 1] > 0.5) == C["b"]).mean() > 0.95)
        True
        """
        if not propagate:
            return self._apply_interventions(X, interventions, concepts)[0]
        return self._intervened_tensor(X, interventions, concepts).cpu().numpy()

    # ------------------------------------------------------------------ probabilities from the energy
    def _statistics(self, top: int = 10) -> dict[str, Any]:
        """Normalised moments of ``p(c, y) ∝ exp(-E_global(c, y))`` (exact or Gibbs), cached per fit.

        ``"Z"`` ``[m]``: ``p(y)``; ``"S1"`` ``[m, k]``: ``p(y, c_k = 1)``; ``"S2"`` ``[k, k]``:
        ``p(c_j = 1, c_k = 1)``; ``"top"``: per class, ``[(p(c, y), state [k] bool), ...]`` best first.
        """
        k = self.bank_.n_concepts
        exact = k <= int(self.exact_max_concepts)
        key = (exact,) if exact else (exact, self.n_chains, self.n_sweeps, self._seed)
        cache = getattr(self, "_statistics_cache", None)
        if cache is not None and cache[0] is self.energies_ and cache[1] == key and cache[2] >= top:
            return cache[3]
        with torch.no_grad():
            stats = self._exact_statistics(top) if exact else self._gibbs_statistics(top)
        self._statistics_cache = (self.energies_, key, top, stats)
        return stats

    def _exact_statistics(self, top: int) -> dict[str, Any]:
        net = self.energies_
        k, m = net.k, net.m
        dev = self.energies_.prior_bias.device
        bits = torch.arange(k, device=dev)
        shift: float | None = None
        Zm = torch.zeros(m, dtype=torch.float64, device=dev)
        S1 = torch.zeros(m, k, dtype=torch.float64, device=dev)
        S2 = torch.zeros(k, k, dtype=torch.float64, device=dev)
        best_lw: list[Tensor] = []
        best_idx: list[Tensor] = []
        for lo in range(0, 2 ** k, _STATE_CHUNK):
            idx = torch.arange(lo, min(lo + _STATE_CHUNK, 2 ** k), device=dev)
            states = ((idx[:, None] >> bits) & 1).to(torch.float32)
            lw = -net.global_energies(states).double()                    # [s, m] unnormalised log p(c, y)
            top_lw = float(lw.max())
            if shift is None or top_lw > shift:
                if shift is not None:
                    r = math.exp(shift - top_lw)
                    Zm, S1, S2 = Zm * r, S1 * r, S2 * r
                shift = top_lw
            W = torch.exp(lw - shift)
            Sd = states.double()
            Zm += W.sum(0)
            S1 += W.T @ Sd
            S2 += (Sd * W.sum(1, keepdim=True)).T @ Sd
            vals, pos = torch.topk(lw, min(top, len(idx)), dim=0)          # [t, m]
            best_lw.append(vals)
            best_idx.append(idx[pos])
        if shift is None:  # no chunk: k == 0 concepts
            raise ValueError("EnergyCBM has no concepts to enumerate; fit it with at least one concept column.")
        total = float(Zm.sum())
        log_total = math.log(total) + shift
        L_all, I_all = torch.cat(best_lw), torch.cat(best_idx)
        order = torch.argsort(L_all, dim=0, descending=True)[:top]
        L_top, I_top = torch.gather(L_all, 0, order).cpu(), torch.gather(I_all, 0, order).cpu()
        tops = [[(math.exp(float(L_top[r, j]) - log_total), ((int(I_top[r, j]) >> np.arange(k)) & 1).astype(bool))
                 for r in range(L_top.shape[0])] for j in range(m)]
        return {"Z": (Zm / total).cpu().numpy(), "S1": (S1 / total).cpu().numpy(), "S2": (S2 / total).cpu().numpy(),
                "top": tops, "method": "exact"}

    def _gibbs_statistics(self, top: int) -> dict[str, Any]:
        net = self.energies_
        k, m = net.k, net.m
        dev = self.energies_.prior_bias.device
        gen = seeded_generator(self._seed + 23, dev)
        n, sweeps = int(self.n_chains), int(self.n_sweeps)
        prev = torch.as_tensor(self.concept_prevalence_, dtype=torch.float32, device=dev)
        c = (torch.rand(n, k, generator=gen, device=dev) < prev).float()
        c = net.gibbs(c, max(1, sweeps // 3), gen)                        # burn-in
        Zm = torch.zeros(m, dtype=torch.float64, device=dev)
        S1 = torch.zeros(m, k, dtype=torch.float64, device=dev)
        S2 = torch.zeros(k, k, dtype=torch.float64, device=dev)
        keys = np.zeros((0, (k + 7) // 8), dtype=np.uint8)                 # distinct visited states (packed)
        sums = np.zeros((0, m), dtype=np.float64)                          # their summed p(y | c)
        pending_keys: list[np.ndarray] = []
        pending_sums: list[np.ndarray] = []
        count = 0
        for _ in range(max(1, sweeps - sweeps // 3)):
            c = net.gibbs(c, 1, gen)
            P = net.label_log_proba(c).exp().double()                      # p(y | c)
            Cd = c.double()
            Zm += P.sum(0)
            S1 += P.T @ Cd
            S2 += Cd.T @ Cd
            count += n
            pending_keys.append(np.packbits(c.cpu().numpy().astype(bool), axis=1))
            pending_sums.append(P.cpu().numpy())
            if sum(len(b) for b in pending_keys) >= _GIBBS_MERGE_ROWS:
                keys, sums = _merge_states([keys, *pending_keys], [sums, *pending_sums])
                pending_keys, pending_sums = [], []
        keys, sums = _merge_states([keys, *pending_keys], [sums, *pending_sums])
        Wk = torch.from_numpy(sums / count)                                # [u, m] estimates of p(c, y)
        order = torch.argsort(Wk, dim=0, descending=True)[:top]
        tops = [[(float(Wk[i, j]), np.unpackbits(keys[i])[:k].astype(bool))
                 for i in order[:, j].tolist()] for j in range(m)]
        return {"Z": (Zm / count).cpu().numpy(), "S1": (S1 / count).cpu().numpy(), "S2": (S2 / count).cpu().numpy(),
                "top": tops, "method": "gibbs"}

    def conditional_probabilities(
        self, kind: str = "concept|class", *, class_names: Sequence[str] | Mapping[Any, str] | None = None
    ) -> pd.DataFrame:
        """Probabilities computed from the global energy, ``p(c, y) ∝ exp(-E_global(c, y))``.

        Exact sums over all ``2^k`` concept vectors when ``k <= exact_max_concepts``, otherwise averages
        over ``n_chains`` Gibbs chains of the concept prior (weighted by ``p(y | c)``).

        Parameters
        ----------
        kind
            ``"concept|class"``: ``p(c_k = 1 | y = m)`` (rows: classes, columns: concepts);
            ``"concept|concept"``: ``p(c_k = 1 | c_j = 1)`` (rows: the given concept ``j``, columns ``k``);
            ``"concept|not concept"``: ``p(c_k = 1 | c_j = 0)``; ``"joint"``: ``p(y = m, c_k = 1)``;
            ``"class"``: ``p(y = m)`` (one column ``"p"``).
        class_names
            Row labels for the classes (a list indexed by label, or ``{label: name}``); default the labels.

        Returns
        -------
        pd.DataFrame
            Probabilities; ``attrs["kind"]`` is ``kind`` and ``attrs["method"]`` ``"exact"`` or ``"gibbs"``.

        Examples
        --------
        >>> import numpy as np, pandas as pd
        >>> rng = np.random.default_rng(1)
        >>> C = pd.DataFrame({"a": rng.random(300) < 0.3})
        >>> head = EnergyCBM(n_epochs=60, hidden=8, global_hidden=4, prior_hidden=2).fit(
        ...     C.to_numpy(float), rng.integers(0, 2, 300), C)
        >>> bool(abs(head.conditional_probabilities("concept|class").loc[0, "a"] - 0.3) < 0.1)
        True
        """
        self._check_fitted()
        if kind not in CONDITIONAL_KINDS:
            raise ValueError(f"kind must be one of {CONDITIONAL_KINDS}; got {kind!r}.")
        st = self._statistics()
        table = _tables(st["Z"], st["S1"], st["S2"], kind, list(self.bank_.names), self._class_labels(class_names))
        table.attrs["method"] = st["method"]
        return table

    def top_configurations(
        self, top: int = 5, *, class_names: Sequence[str] | Mapping[Any, str] | None = None
    ) -> pd.DataFrame:
        """The most probable concept vectors of each class under ``p(c | y) ∝ exp(-E_global(c, y))``.

        ECBM's "joint concept importance": which combinations of concepts the energy ties to a class
        (exact or Gibbs, as :meth:`conditional_probabilities`).

        Returns
        -------
        pd.DataFrame
            ``class``, ``rank``, ``concepts`` (the names of the concepts that are on, joined by ``" & "``;
            ``"(none)"`` for the empty vector) and ``probability`` (``p(c | y)``).

        Examples
        --------
        >>> import numpy as np, pandas as pd
        >>> C = pd.DataFrame({"a": [True, False] * 50, "b": [True, False] * 50})
        >>> head = EnergyCBM(n_epochs=60, hidden=8, global_hidden=4, prior_hidden=4).fit(
        ...     C.to_numpy(float), [0, 1] * 50, C)
        >>> sorted(head.top_configurations(1)["concepts"])
        ['(none)', 'a & b']
        """
        self._check_fitted()
        if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1:
            raise ValueError(f"top must be a positive integer; got {top!r}.")
        st = self._statistics(max(int(top), 10))
        names = np.asarray(self.bank_.names, dtype=object)
        rows = []
        for j, lab in enumerate(self._class_labels(class_names)):
            py = float(st["Z"][j])
            for r, (pj, state) in enumerate(st["top"][j][: int(top)]):
                on = [str(x) for x in names[state]]
                rows.append({"class": lab, "rank": r + 1, "concepts": " & ".join(on) or "(none)",
                             "probability": pj / py if py > 0 else math.nan})
        out = pd.DataFrame(rows, columns=["class", "rank", "concepts", "probability"])
        out.attrs["method"] = st["method"]
        return out

    def _class_labels(self, class_names: Any) -> list[Any]:
        if class_names is None:
            return [c.item() if hasattr(c, "item") else c for c in self.classes_]
        return class_texts(self.classes_, class_names)

    def _summary_html(self) -> str:
        wc, wy, wg = self.inference_weights
        return (f"<p>energies: concept / class / global; inference weights ({wc}, {wy}, {wg}), "
                f"temperature {self.temperature}</p>")


# ----------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------
def _tables(Z: np.ndarray, S1: np.ndarray, S2: np.ndarray, kind: str, names: list[str], classes: list[Any]) -> pd.DataFrame:
    """Probability tables from ``Z[m] = sum w``, ``S1[m, k] = sum w c_k``, ``S2[j, k] = sum w c_j c_k``."""
    total = float(Z.sum())
    marg = S1.sum(0)  # [k]
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "concept|class":
            out = pd.DataFrame(S1 / Z[:, None], index=pd.Index(classes, name="class"), columns=names)
        elif kind == "joint":
            out = pd.DataFrame(S1 / total, index=pd.Index(classes, name="class"), columns=names)
        elif kind == "class":
            out = pd.DataFrame({"p": Z / total}, index=pd.Index(classes, name="class"))
        elif kind == "concept|concept":
            out = pd.DataFrame(S2 / marg[:, None], index=pd.Index(names, name="given"), columns=names)
        else:  # p(c_k = 1 | c_j = 0) = (sum w c_k - sum w c_j c_k) / (total - sum w c_j)
            out = pd.DataFrame((marg[None, :] - S2) / (total - marg)[:, None], index=pd.Index(names, name="given not"),
                               columns=names)
    out.attrs["kind"] = kind
    return out


def empirical_conditionals(
    concepts: pd.DataFrame,
    y: Any = None,
    kind: str = "concept|class",
    *,
    classes: Sequence[Any] | None = None,
    class_names: Sequence[str] | Mapping[Any, str] | None = None,
) -> pd.DataFrame:
    """The tables of :meth:`EnergyCBM.conditional_probabilities` counted from labelled data.

    Parameters
    ----------
    concepts
        Boolean concept labels ``[n, k]`` (select the head's columns first).
    y
        Class labels ``[n]`` (needed for every kind but ``"concept|concept"`` / ``"concept|not concept"``).
    kind
        One of :data:`CONDITIONAL_KINDS`.
    classes
        The classes (rows) in order (default: the sorted unique ``y``; use the head's ``classes_``).
    class_names
        Row labels, as in :meth:`EnergyCBM.conditional_probabilities`.

    Examples
    --------
    >>> C = pd.DataFrame({"a": [True, True, False, False], "b": [True, False, False, False]})
    >>> float(empirical_conditionals(C, kind="concept|concept").loc["a", "b"])
    0.5
    """
    if kind not in CONDITIONAL_KINDS:
        raise ValueError(f"kind must be one of {CONDITIONAL_KINDS}; got {kind!r}.")
    table = as_concept_frame(concepts, what="concepts")
    Cd = table.to_numpy(np.float64)
    names = list(table.columns)
    if y is None:
        if kind not in ("concept|concept", "concept|not concept"):
            raise ValueError(f"kind {kind!r} needs the class labels y.")
        yy = np.zeros(len(Cd), dtype=int)
        cls: list[Any] = [0]
    else:
        yv = np.asarray(y)
        if yv.ndim != 1 or len(yv) != len(Cd):
            raise ValueError(f"y must have one label per row of concepts ({len(Cd)}); got shape {yv.shape}.")
        cls = list(np.unique(yv)) if classes is None else list(classes)
        lookup = {c: i for i, c in enumerate(cls)}
        unknown = sorted({v for v in yv.tolist() if v not in lookup}, key=str)
        if unknown:
            raise ValueError(f"y has labels {unknown[:5]} that are not in classes {cls[:10]}.")
        yy = np.array([lookup[v] for v in yv.tolist()], dtype=int)
    Y = np.eye(len(cls))[yy]
    Z, S1, S2 = Y.sum(0), Y.T @ Cd, Cd.T @ Cd
    labels = [c.item() if hasattr(c, "item") else c for c in cls]
    if class_names is not None:
        labels = class_texts(cls, class_names)
    out = _tables(Z, S1, S2, kind, names, labels)
    out.attrs["method"] = "empirical"
    return out


def conditional_mae(model_table: pd.DataFrame, empirical_table: pd.DataFrame, *, min_support: int = 0,
                    support: pd.Series | None = None) -> float:
    """Mean absolute difference of two probability tables on their common, finite cells.

    Parameters
    ----------
    model_table, empirical_table
        Tables with the same layout (e.g. from :meth:`EnergyCBM.conditional_probabilities` and
        :func:`empirical_conditionals`). The diagonal of ``"concept|concept"`` tables (always 1) is skipped.
    min_support, support
        Skip the rows whose ``support`` (number of samples behind the empirical row, indexed like the
        rows) is below ``min_support``.

    Examples
    --------
    >>> a = pd.DataFrame({"x": [0.5, 0.2]}); b = pd.DataFrame({"x": [0.4, 0.4]})
    >>> round(conditional_mae(a, b), 3)
    0.15
    """
    A = model_table.reindex(index=empirical_table.index, columns=empirical_table.columns)
    D = (A - empirical_table).abs().to_numpy(np.float64, copy=True)
    if A.index.name in ("given", "given not") and A.shape[0] == A.shape[1]:
        np.fill_diagonal(D, np.nan)
    if support is not None and min_support:
        keep = support.reindex(empirical_table.index).fillna(0).to_numpy() >= min_support
        D = D[keep]
    D = D[np.isfinite(D)]
    if D.size == 0:
        raise ValueError("the two tables share no finite cells; check that they have the same rows and columns.")
    return float(D.mean())


def plot_conditionals(table: pd.DataFrame, ax: Any = None, *, annotate: bool | None = None, cmap: str = "viridis",
                      title: str | None = None) -> Any:
    """Heatmap of a probability table (rows x columns, colour scale 0..1); returns the matplotlib Axes.

    Parameters
    ----------
    table
        E.g. :meth:`EnergyCBM.conditional_probabilities` or :func:`empirical_conditionals`.
    ax
        Axes to draw on (default: a new figure).
    annotate
        Write the probabilities in the cells (default: when the table has at most 400 cells).
    cmap
        Matplotlib colour map.
    title
        Axes title (default: the table's kind, from its index name).

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> ax = plot_conditionals(pd.DataFrame({"a": [0.2, 0.9]}, index=["x", "y"]))
    >>> ax.get_ylabel()
    ''
    """
    import matplotlib.pyplot as plt

    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a pandas DataFrame of probabilities; got {type(table).__name__}.")
    values = table.to_numpy(np.float64)
    if ax is None:
        h, w = values.shape
        _, ax = plt.subplots(figsize=(max(3.0, 0.45 * w + 2), max(2.5, 0.4 * h + 1.5)))
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    ax.set_xticks(range(values.shape[1]))
    ax.set_xticklabels([str(c) for c in table.columns], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(values.shape[0]))
    ax.set_yticklabels([str(r) for r in table.index], fontsize=8)
    if annotate is None:
        annotate = values.size <= 400
    if annotate:
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = values[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.5 else "black")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title is None:
        title = {"concept|class": "p(concept | class)", "concept|concept": "p(column | row)",
                 "concept|not concept": "p(column | not row)", "joint": "p(class, concept)",
                 "class": "p(class)"}.get(str(table.attrs.get("kind")), "")
    if title:
        ax.set_title(title, fontsize=9)
    return ax
