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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Structure:
    """The network's parents (node -> parent ids) and the edges added so that every concept
    the prediction reacts to has a path to the outcome."""

    parents: dict[str, list[str]]
    added_for_paths: list[str]


def choose_structure(ids: Mapping[str, Sequence[str]], layers: Sequence[str], reacting: Mapping[int, np.ndarray],
                     influence: Sequence[np.ndarray], cfg: Any, outcome: str) -> Structure:
    """Parents layer by layer, from the outcome back to the first concept layer.

    ids: layer -> concept ids; reacting: layer index -> (K,) change of the prediction when
    each concept is intervened on; influence[i]: (K_i, K_{i+1}) how much each concept of
    layer i moves each of layer i+1; ``cfg``: the concept config's ``outcome_max_indegree``,
    ``max_indegree``, ``min_influence`` and ``reacting_threshold``. The outcome's parents
    are the last layer's most reacting concepts plus every one above the threshold; a
    reacting concept of an earlier layer with no path to the outcome gets an edge to the
    connected child it influences most."""
    last = len(layers) - 1
    parents: dict[str, list[str]] = {}
    y_parents = choose_parents(reacting[last], cfg.outcome_max_indegree, 0.0)
    connected = set(y_parents)
    for c_np in np.flatnonzero(reacting[last] >= cfg.reacting_threshold):
        if int(c_np) not in connected:
            y_parents.append(int(c_np))
            connected.add(int(c_np))
    parents[outcome] = [ids[layers[last]][c] for c in sorted(y_parents)]
    added_for_paths = []
    for i in range(last - 1, -1, -1):
        child_layer = layers[i + 1]
        infl = influence[i]
        chosen = {ch: choose_parents(infl[:, ch], cfg.max_indegree, cfg.min_influence)
                  for ch in range(infl.shape[1])}
        has_path = {p: any(p in chosen[ch] for ch in connected) for p in range(infl.shape[0])}
        for p_np in np.flatnonzero(reacting[i] >= cfg.reacting_threshold):
            p = int(p_np)
            if not has_path[p] and connected:
                best = max(connected, key=lambda ch: infl[p, ch])
                chosen[best].append(p)
                added_for_paths.append(f"{ids[layers[i]][p]} -> {ids[child_layer][best]}")
        for ch, ps in chosen.items():
            parents[ids[child_layer][ch]] = [ids[layers[i]][p] for p in sorted(ps)]
        connected = {p for p in range(infl.shape[0]) if any(p in chosen[ch] for ch in connected)}
    for cid in ids[layers[0]]:
        parents[cid] = []
    return Structure(parents, added_for_paths)


def fit_tables(ids: Mapping[str, Sequence[str]], layers: Sequence[str], parents: Mapping[str, Sequence[str]],
               observed: Mapping[str, np.ndarray], y: np.ndarray, iv_states: Sequence[Mapping[int, np.ndarray]],
               iv_y: Sequence[np.ndarray], num_classes: int, cfg: Any, outcome: str) -> tuple[list[Any], dict[str, Any], int]:
    """Every node's table (:func:`fit_table`) from the observational rows and the
    interventional rows: ``iv_states[i][k]`` the states of layer k after interventions at
    layer i (..., K_k), ``iv_y[i]`` the predictions after them. A node of layer k is fitted on
    the observational rows and those of interventions at layers before it (its parents'
    layer included). Returns the CPTs, each node's support and the number of interventional
    rows of the outcome's table."""
    from handlers.runtime.causal import CPT
    s, last = cfg.states, len(layers) - 1

    def rows(k: int, upto: int) -> np.ndarray:
        """States of layer k (M, K_k): the observational rows, then the rows of every
        intervention at layers 0..upto."""
        parts = [observed[layers[k]]] + [iv_states[i][k].reshape(-1, iv_states[i][k].shape[-1])
                                         for i in range(upto + 1)]
        return np.concatenate(parts).astype(np.int64)

    cpts, support = [], {}
    root = observed[layers[0]]
    for c, cid in enumerate(ids[layers[0]]):
        fit = fit_table(np.zeros((len(root), 0), np.int64), root[:, c], [], s, cfg.backoff, cfg.l2)
        cpts.append(CPT(cid, tuple(range(s)), (), fit.table))
        support[cid] = fit.support
    for j in range(last):
        par, chi = rows(j, j), rows(j + 1, j)
        col = {cid: k for k, cid in enumerate(ids[layers[j]])}
        for ch, cid in enumerate(ids[layers[j + 1]]):
            pnames = list(parents[cid])
            fit = fit_table(par[:, [col[p] for p in pnames]], chi[:, ch], [s] * len(pnames), s, cfg.backoff, cfg.l2)
            cpts.append(CPT(cid, tuple(range(s)), tuple(pnames), fit.table))
            support[cid] = fit.support
    par = rows(last, last)
    yy = np.concatenate([y] + [iv_y[i].reshape(-1) for i in range(last + 1)])
    col = {cid: k for k, cid in enumerate(ids[layers[last]])}
    y_parents = list(parents[outcome])
    fit = fit_table(par[:, [col[p] for p in y_parents]], yy, [s] * len(y_parents), num_classes, cfg.backoff, cfg.l2)
    cpts.append(CPT(outcome, tuple(range(num_classes)), tuple(y_parents), fit.table))
    support[outcome] = fit.support
    return cpts, support, int(len(yy) - len(y))
