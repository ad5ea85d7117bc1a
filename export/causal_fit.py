"""Fitting the causal concept network on what interventions do (method 1, offline).

The Bayesian network is asked interventional questions (``P(Y | do(X = x), ...)``), so its
conditional tables are fitted on samples the classifier itself produced under
interventions, beside the observational ones:

* **Samples.** For each training image, concept layer ``l``, channel ``c`` and state ``s``
  the channel's code map is rescaled so its spatial max is the state's typical value, the
  code is decoded and the rest of the network runs. Every later concept layer is
  re-encoded and discretised, and the predicted class is recorded. One row holds the
  states of every concept layer and ``Y`` under that intervention (layers before ``l``
  keep their observed states, layer ``l`` its observed states with ``c := s``).
* **Structure.** A concept's parents are the previous layer's concepts whose interventions
  move it most (mean absolute change of its pooled value, in units of its standard
  deviation, against the null intervention ``do(c = observed state)``); ``Y``'s parents are
  the last layer's concepts whose interventions move the network's probability of its own
  prediction most. A concept the network reacts to (mean ``|ΔP(prediction)| >= 0.01``)
  always gets a path to ``Y``.
* **Tables.** Each node's table is a multinomial logistic regression on one-hot parent
  states (main effects, L2), fitted on all rows and tabulated over every parent
  configuration, combined with the configuration's own counts as a Dirichlet prior of
  strength ``backoff``: ``P(v | cfg) = (n(cfg, v) + backoff * L(v | cfg)) / (n(cfg) + backoff)``.
  A configuration seen often answers from its counts; one never seen answers from the
  logistic model, which every row informs. No answer comes from a flat prior.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TableFit:
    """A fitted conditional table ``P(child | parents)``.

    table: float64 (child_card, *parent_cards), columns sum to one;
    support: int64 (*parent_cards,) number of fitting rows at each parent configuration.
    """

    table: np.ndarray
    support: np.ndarray


def one_hot_configs(parent_cards: Sequence[int]) -> np.ndarray:
    """Every parent configuration in C order as concatenated one-hot blocks:
    (prod(cards), sum(cards)) float64."""
    cards = [int(c) for c in parent_cards]
    if not cards:
        return np.zeros((1, 0))
    grid = np.indices(cards).reshape(len(cards), -1).T  # (configs, parents)
    return one_hot(grid, cards)


def one_hot(states: np.ndarray, cards: Sequence[int]) -> np.ndarray:
    """states int (N, P) with states[:, j] < cards[j] -> (N, sum(cards)) float64 one-hot blocks."""
    offsets = np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int64)
    out = np.zeros((states.shape[0], int(sum(cards))))
    if states.shape[1]:
        out[np.arange(states.shape[0])[:, None], states + offsets[None, :]] = 1.0
    return out


def logistic_table(parent_states: np.ndarray, child: np.ndarray, parent_cards: Sequence[int], child_card: int,
                   weights: np.ndarray | None = None, l2: float = 1e-3, iterations: int = 200) -> np.ndarray:
    """Multinomial logistic regression of ``child`` on one-hot ``parent_states``, tabulated.

    parent_states int (N, P); child int (N,) in 0..child_card-1; weights (N,) or None (row
    counts). The loss is the weighted mean cross-entropy plus ``l2`` times the squared
    weights (not the biases). Returns float64 (child_card, *parent_cards): the model's
    ``P(child | configuration)`` for every configuration, fitted or not.
    """
    cards = [int(c) for c in parent_cards]
    w = np.ones(len(child)) if weights is None else np.asarray(weights, dtype=np.float64)
    x = torch.from_numpy(one_hot(np.asarray(parent_states, dtype=np.int64).reshape(len(child), len(cards)), cards))
    y = torch.from_numpy(np.asarray(child, dtype=np.int64))
    wt = torch.from_numpy(w / w.sum())
    coef = torch.zeros(x.shape[1], child_card, dtype=torch.float64, requires_grad=True)
    counts = np.bincount(np.asarray(child), weights=w, minlength=child_card) + 1e-3
    bias = torch.tensor(np.log(counts / counts.sum()), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([coef, bias], lr=1.0, max_iter=iterations, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logp = torch.log_softmax(x @ coef + bias, dim=1)
        loss = -(wt * logp[torch.arange(len(y)), y]).sum() + l2 * coef.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        grid = torch.from_numpy(one_hot_configs(cards))
        probs = torch.softmax(grid @ coef + bias, dim=1).numpy()  # (configs, child_card)
    return probs.T.reshape([child_card, *cards]).copy()


def fit_table(parent_states: np.ndarray, child: np.ndarray, parent_cards: Sequence[int], child_card: int,
              backoff: float, l2: float = 1e-3) -> TableFit:
    """The node's table: configuration counts backed off to the tabulated logistic model.

    parent_states int (N, P), child int (N,). ``P(v | cfg) = (n(cfg, v) + backoff L(v | cfg))
    / (n(cfg) + backoff)``. Rows are first aggregated per (configuration, child state), so
    the regression costs at most ``prod(cards) * child_card`` weighted rows.
    """
    cards = [int(c) for c in parent_cards]
    parent_states = np.asarray(parent_states, dtype=np.int64).reshape(len(child), len(cards))
    child = np.asarray(child, dtype=np.int64)
    n_cfg = int(np.prod(cards)) if cards else 1
    cfg = np.ravel_multi_index(parent_states.T, cards) if cards else np.zeros(len(child), dtype=np.int64)
    counts = np.zeros((n_cfg, child_card))
    np.add.at(counts, (cfg, child), 1.0)
    seen_cfg, seen_v = np.nonzero(counts)
    grid = np.indices(cards).reshape(len(cards), -1).T if cards else np.zeros((1, 0), dtype=np.int64)
    logistic = logistic_table(grid[seen_cfg], seen_v, cards, child_card, counts[seen_cfg, seen_v], l2)
    logistic = logistic.reshape(child_card, n_cfg).T  # (configs, child_card)
    support = counts.sum(axis=1)
    table = (counts + backoff * logistic) / (support[:, None] + backoff)
    return TableFit(table.T.reshape([child_card, *cards]).copy(), support.astype(np.int64).reshape(cards))


def choose_parents(influence: np.ndarray, cap: int, minimum: float) -> list[int]:
    """Indices of the candidates with the largest ``influence`` (K,), at most ``cap``, each at
    least ``minimum``, largest first."""
    order = np.argsort(-influence, kind="stable")
    return [int(i) for i in order[:cap] if influence[i] >= minimum]
