"""Method 1 offline: concept autoencoders, discretisation, the Bayesian network, validity.

Harradon, Druce & Ruttenberg (2018): at each chosen layer an autoencoder turns the
activations into K concept maps; each concept is pooled (spatial max) and discretised into
S states; a Bayesian network over the concepts and the network's predicted class ``Y`` is
learned with edges only from one concept layer to the next and from the last to ``Y``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from export.data.loader import ImageDataset
from export.device import autocast, device_of, is_mixed, to_numpy
from export.splice import Splice, capture
from export.train import batches, one_cycle
from handlers.runtime.causal import CompiledCausalModel
from handlers.runtime.concepts import concept_id, discretise, evidence_row, fit_edges, pooled_values
from handlers.runtime.concepts import set_code_peak as _set_code_peak
from handlers.runtime.imaging import InputSpec, normalize

log = logging.getLogger(__name__)
OUTCOME = "Y"


@dataclass(frozen=True)
class ConceptConfig:
    """Settings of the concept pipeline (defaults chosen for the demo network)."""

    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    k: int = 8
    states: int = 4
    epochs: int = 4
    min_steps: int = 180  # small data sets train more epochs, so every autoencoder gets this many steps
    batch_size: int = 128
    lr: float = 1e-2
    deep_weight: float = 0.1
    deep_warmup_epochs: int = 1  # deep loss weight ramps linearly from 0 over these epochs
    hidden_multiplier: float = 2.0  # autoencoder hidden width = multiplier x layer channels
    sparsity_weight: float = 0.02
    tv_weight: float = 0.0
    train_images: int = 6000
    max_indegree: int = 3  # parents of a concept, from the previous concept layer
    outcome_max_indegree: int = 8  # parents of Y, from the last concept layer
    intervention_images: int = 1200  # training images put through every single-concept intervention
    backoff: float = 5.0  # Dirichlet strength of the logistic table at each parent configuration
    l2: float = 1e-3  # L2 weight of the logistic tables
    min_influence: float = 0.02  # least mean |change| (in stds) of a child for an edge
    reacting_threshold: float = 0.01  # mean |change of P(prediction)| that makes a concept "reacting"
    validity_images: int = 300
    # the classifier's activations of the training images are computed once and kept (on the
    # training device) when they fit in this many MiB, instead of once per epoch
    activation_cache_mib: int = 4096
    atlas_images: int = 8  # training images per atlas strip (export/atlas.py); 0: no atlas
    # "bf16": the autoencoders' training passes (classifier and spliced classifier included)
    # under bfloat16 autocast, weights and losses in float32 (as export.train.TrainConfig)
    precision: str = "fp32"
    seed: int = 0


class ConceptAutoencoder(nn.Module):
    """Convolutional autoencoder on one layer's activations.

    encode: (N, C, H, W) -> non-negative codes (N, K, H, W); decode: back to (N, C, H, W).
    ``nonneg`` ends the decoder with a ReLU (for post-ReLU activations).
    """

    def __init__(self, channels: int, k: int, hidden: int | None = None, nonneg: bool = True) -> None:
        super().__init__()
        h = hidden or max(channels, 2 * k)
        self.encoder = nn.Sequential(nn.Conv2d(channels, h, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(h, k, 1), nn.ReLU())
        self.decoder = nn.Sequential(nn.Conv2d(k, h, 3, padding=1), nn.ReLU(), nn.Conv2d(h, channels, 1),
                                     nn.ReLU() if nonneg else nn.Identity())

    def forward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(a)
        return z, self.decoder(z)


@torch.no_grad()
def pooled_activations(model: nn.Module, layers: Sequence[str], ds: ImageDataset, spec: InputSpec,
                       keep_raw: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per layer, the globally average-pooled output as float64 (N, C) (vectors are flattened),
    and for the layers in ``keep_raw`` only, the raw activations (N, C, H, W)."""
    pooled: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    raw: dict[str, list[np.ndarray]] = {l: [] for l in keep_raw}
    for x, _ in batches(ds, spec, 256, device=device_of(model)):
        _, acts = capture(model, list(dict.fromkeys([*layers, *keep_raw])), x)
        for l in layers:
            a = acts[l]
            pooled[l].append(to_numpy(a.mean(dim=(2, 3)) if a.ndim == 4 else a.reshape(a.shape[0], -1)))
        for l in keep_raw:
            raw[l].append(to_numpy(acts[l]))
    return ({l: np.concatenate(v).astype(np.float64) for l, v in pooled.items()},
            {l: np.concatenate(v) for l, v in raw.items()})


def spliced_logits(model: nn.Module, layer: str, x: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """Logits of the network with ``layer``'s output replaced by ``replacement`` (f_{>l}),
    the whole network run on ``x`` (the reference :class:`export.splice.Splice` is checked
    against)."""
    return Splice(model, layer).logits(x, replacement)


def _tv(z: torch.Tensor) -> torch.Tensor:
    return (z[:, :, 1:, :] - z[:, :, :-1, :]).abs().mean() + (z[:, :, :, 1:] - z[:, :, :, :-1]).abs().mean()


def _new_autoencoders(acts: dict[str, torch.Tensor], cfg: ConceptConfig
                      ) -> tuple[dict[str, ConceptAutoencoder], dict[str, float]]:
    """One untrained autoencoder per concept layer, sized from a sample of its activations
    (layer -> (N, C, H, W)) and created on their device, and each layer's mean squared
    activation (the loss scale)."""
    aes: dict[str, ConceptAutoencoder] = {}
    scale: dict[str, float] = {}
    for l in cfg.layers:
        a = acts[l]
        if a.ndim != 4:
            raise ValueError(f"concept layer {l} must have (N, C, H, W) activations, got {tuple(a.shape)}")
        hidden = max(int(round(cfg.hidden_multiplier * a.shape[1])), 2 * cfg.k)
        aes[l] = ConceptAutoencoder(a.shape[1], cfg.k, hidden=hidden, nonneg=bool((a >= 0).all())).to(a.device)
        scale[l] = float(a.pow(2).mean()) + 1e-8
    return aes, scale


def _autoencoder_loss(splices: dict[str, Splice], aes: dict[str, ConceptAutoencoder], scale: dict[str, float],
                      x: torch.Tensor, acts: dict[str, torch.Tensor], logp: torch.Tensor, ramp: float,
                      cfg: ConceptConfig, sums: dict[str, float]) -> torch.Tensor:
    """The batch's loss over every layer: shallow reconstruction (scaled MSE), deep
    reconstruction (KL of the spliced network's prediction from the classifier's, weighted
    by ``ramp``) and L1 sparsity of the code (plus total variation when configured). Adds
    each term to ``sums`` ("layer/term")."""
    loss = torch.zeros((), device=logp.device)
    for l in cfg.layers:
        z, rec = aes[l](acts[l])
        shallow = F.mse_loss(rec.float(), acts[l].float()) / scale[l]
        deep = F.kl_div(F.log_softmax(splices[l].logits(x, rec).float(), dim=1), logp, log_target=True,
                        reduction="batchmean")
        sparse = z.float().abs().mean() / np.sqrt(scale[l])
        loss = loss + shallow + ramp * cfg.deep_weight * deep + cfg.sparsity_weight * sparse
        if cfg.tv_weight:
            loss = loss + cfg.tv_weight * _tv(z)
        sums[f"{l}/shallow"] += float(shallow.detach())
        sums[f"{l}/deep"] += float(deep.detach())
        sums[f"{l}/sparse"] += float(sparse.detach())
    return loss


def train_autoencoders(model: nn.Module, ds: ImageDataset, spec: InputSpec, cfg: ConceptConfig,
                       progress: bool = True) -> tuple[dict[str, ConceptAutoencoder], dict[str, Any]]:
    """Train one autoencoder per layer with shallow + deep (KL) reconstruction + L1 sparsity.

    The classifier stays frozen; training runs on its device. Returns the autoencoders (eval
    mode, on that device) and a training log.
    """
    torch.manual_seed(cfg.seed)
    device = device_of(model)
    mixed = is_mixed(cfg.precision, device)
    rng = np.random.default_rng(cfg.seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    idx = rng.permutation(len(ds))[: cfg.train_images]
    with torch.no_grad():
        _, acts0 = capture(model, cfg.layers, torch.from_numpy(normalize(ds.pixels[idx[:256]], spec)).to(device))
    aes, scale = _new_autoencoders(acts0, cfg)
    params = [p for ae in aes.values() for p in ae.parameters()]
    steps_per_epoch = -(-len(idx) // cfg.batch_size)
    epochs = max(cfg.epochs, -(-cfg.min_steps // steps_per_epoch))
    steps = epochs * steps_per_epoch
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = one_cycle(opt, cfg.lr, steps, 0.2)
    history: list[dict[str, float]] = []
    bar = tqdm(total=steps, desc="concept autoencoders", disable=not progress, unit="step")
    sub = ds.take(idx)
    t0 = time.perf_counter()
    step = 0
    splices = _splices(model, cfg.layers, torch.from_numpy(normalize(sub.pixels[:4], spec)).to(device))
    cache = _cached_activations(model, sub, spec, cfg, acts0, device, mixed)
    for epoch in range(epochs):
        sums = {f"{l}/{t}": 0.0 for l in cfg.layers for t in ("shallow", "deep", "sparse")}
        n = 0
        order = rng.permutation(len(sub))
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            x = torch.from_numpy(normalize(sub.pixels[rows], spec)).to(device)
            with autocast(device, mixed):
                if cache is None:
                    with torch.no_grad():
                        logits, acts = capture(model, cfg.layers, x)
                        logp = F.log_softmax(logits.float(), dim=1)
                else:
                    at = torch.from_numpy(rows).to(device)
                    acts, logp = {l: a[at] for l, a in cache[0].items()}, cache[1][at]
                ramp = min(1.0, step / max(cfg.deep_warmup_epochs * steps_per_epoch, 1))
                step += 1
                loss = _autoencoder_loss(splices, aes, scale, x, acts, logp, ramp, cfg, sums)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}")
        history.append({"epoch": epoch + 1, **{k: v / max(n, 1) for k, v in sums.items()}})
    bar.close()
    for ae in aes.values():
        ae.eval()
    return aes, {"history": history, "seconds": round(time.perf_counter() - t0, 1), "images": len(idx),
                 "activations_cached": cache is not None,
                 "prefix_on_one_image": sorted(l for l, sp in splices.items() if sp.prefix_rows == 1)}


@torch.no_grad()
def _cached_activations(model: nn.Module, ds: ImageDataset, spec: InputSpec, cfg: ConceptConfig,
                        sample: dict[str, torch.Tensor], device: torch.device, mixed: bool
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """The frozen classifier's outputs of ``cfg.layers`` (layer -> (N, C, H, W), in the
    training precision) and its log-probabilities (N, classes) for every image of ``ds``, on
    ``device``; None when they could take more than ``cfg.activation_cache_mib`` (sized from
    ``sample``, one batch of the layers' activations, as float32)."""
    per_image = sum(a[0].numel() for a in sample.values()) * 4  # float32; bfloat16 takes half
    if per_image * len(ds) > cfg.activation_cache_mib * 2**20:
        return None
    acts: dict[str, torch.Tensor] = {}
    logp: torch.Tensor | None = None
    start = 0
    for x, _ in batches(ds, spec, 256, device=device):
        with autocast(device, mixed):
            logits, got = capture(model, cfg.layers, x)
        rows = slice(start, start + len(x))
        start += len(x)
        for l, a in got.items():
            if l not in acts:
                acts[l] = torch.empty((len(ds), *a.shape[1:]), dtype=a.dtype, device=device)
            acts[l][rows] = a
        if logp is None:
            logp = torch.empty((len(ds), logits.shape[1]), device=device)
        logp[rows] = F.log_softmax(logits.float(), dim=1)
    return (acts, logp) if logp is not None else None


@dataclass
class Encoded:
    """Per image: logits (N, K) of the original network, pooled concept values per layer
    (N, K_l) and where each code map peaks (layer -> (N, K_l) flat index into the map of
    ``map_shapes[layer]`` = (h, w))."""

    logits: np.ndarray
    values: dict[str, np.ndarray]
    agreement: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, np.ndarray] = field(default_factory=dict)
    map_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)


@torch.no_grad()
def encode_dataset(model: nn.Module, aes: dict[str, ConceptAutoencoder], ds: ImageDataset, spec: InputSpec,
                   layers: Sequence[str], agreement: bool = False, batch_size: int = 256,
                   progress: bool = True) -> Encoded:
    """Logits and pooled concept values; with ``agreement``, also the top-1 agreement of the
    network with each autoencoder spliced in (docs/methods.md, check "agreement")."""
    logits_all: list[np.ndarray] = []
    values: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    peaks: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    shapes: dict[str, tuple[int, int]] = {}
    agree = {l: 0 for l in layers}
    splices: dict[str, Splice] = {}
    for x, _ in tqdm(batches(ds, spec, batch_size, device=device_of(model)), total=-(-len(ds) // batch_size),
                     desc="encode", disable=not progress, unit="batch"):
        logits, acts = capture(model, layers, x)
        if agreement and not splices:
            splices = _splices(model, layers, x)
        logits_all.append(to_numpy(logits))
        for l in layers:
            z, rec = aes[l](acts[l])
            code = to_numpy(z)
            values[l].append(pooled_values(code))
            peaks[l].append(code.reshape(*code.shape[:2], -1).argmax(axis=2).astype(np.int32))
            shapes[l] = (int(code.shape[2]), int(code.shape[3]))
            if agreement:
                agree[l] += int((splices[l].logits(x, rec).argmax(1) == logits.argmax(1)).sum())
    out = Encoded(np.concatenate(logits_all), {l: np.concatenate(v) for l, v in values.items()},
                  peaks={l: np.concatenate(v) for l, v in peaks.items()}, map_shapes=shapes)
    if agreement:
        out.agreement = {l: agree[l] / len(ds) for l in layers}
    return out


def typical_values(values: np.ndarray, states: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Median pooled value of each state per channel, (K, S); an empty state takes its edge."""
    k, s = edges.shape[0], edges.shape[1] + 1
    out = np.zeros((k, s))
    for c in range(k):
        for st in range(s):
            sel = values[states[:, c] == st, c]
            if sel.size:
                out[c, st] = float(np.median(sel))
            else:
                out[c, st] = float(edges[c, min(st, s - 2)])
    return out


def set_code_peak(z: torch.Tensor, channel: int, value: float) -> torch.Tensor:
    """:func:`handlers.runtime.concepts.set_code_peak` on a torch tensor (N, K, H, W), on its device."""
    return torch.from_numpy(_set_code_peak(to_numpy(z), channel, value)).to(z.device)


def _splices(model: nn.Module, layers: Sequence[str], x: torch.Tensor) -> dict[str, Splice]:
    """A checked :class:`Splice` per layer, probed on the first rows of ``x`` (the full
    prefix when ``x`` has a single row)."""
    if len(x) < 2:
        return {l: Splice(model, l) for l in layers}
    return {l: Splice.checked(model, l, x[:4]) for l in layers}


@dataclass
class Interventions:
    """What ``do(concept = state)`` does to the network, for every concept and state.

    For intervened layer index ``i`` (of ``layers``), with K_i concepts, S states, N images:
    ``states[i][j]`` int8 (K_i, S, N, K_j) and ``values[i][j]`` float32 (same shape): the
    states and pooled values of layer ``j >= i`` under the intervention (for ``j == i``:
    the observed states with the channel set); ``y[i]`` int64 (K_i, S, N) the predicted
    class; ``p_pred[i]`` (K_i, S, N) the probability of the image's observed prediction.
    ``observed`` holds the observed states per layer (N, K_l); ``y_observed`` (N,);
    ``p_null`` (L, N) the probability of the prediction with layer i's autoencoder spliced in
    and nothing changed; ``observed_values`` the observed pooled values per layer (N, K_l).
    """

    layers: tuple[str, ...]
    states: list[dict[int, np.ndarray]]
    values: list[dict[int, np.ndarray]]
    y: list[np.ndarray]
    p_pred: list[np.ndarray]
    observed: dict[str, np.ndarray]
    y_observed: np.ndarray
    p_null: np.ndarray
    observed_values: dict[str, np.ndarray]

    def measured_p(self) -> np.ndarray:
        """P(prediction | do(c = x)) as (N, C, S), concepts in layer order."""
        return np.concatenate([p.transpose(2, 0, 1) for p in self.p_pred], axis=1)

    def null_index(self, i: int) -> np.ndarray:
        """Observed state of each concept of layer i per image, shaped (K_i, 1, N) for
        ``take_along_axis`` on the state axis (the null intervention ``do(c = observed)``)."""
        return self.observed[self.layers[i]].T[:, None, :].astype(np.int64)

    def change_of_prediction(self, i: int) -> np.ndarray:
        """Mean |P(prediction | do(c = s)) - P(prediction | do(c = observed))| per concept of
        layer i over images and the other states: (K_i,)."""
        p = self.p_pred[i]
        null = np.take_along_axis(p, self.null_index(i), axis=1)
        s = p.shape[1]
        return np.abs(p - null).sum(axis=(1, 2)) / max((s - 1) * p.shape[2], 1)

    def influence(self, i: int, value_std: np.ndarray) -> np.ndarray:
        """Mean |change of each layer-(i+1) concept's pooled value| under interventions on each
        layer-i concept, in units of that concept's std: (K_i, K_{i+1})."""
        v = self.values[i][i + 1].astype(np.float64)
        null = np.take_along_axis(v, self.null_index(i)[..., None], axis=1)
        s = v.shape[1]
        return np.abs(v - null).sum(axis=(1, 2)) / max((s - 1) * v.shape[2], 1) / np.maximum(value_std, 1e-8)


@torch.no_grad()
def run_interventions(model: nn.Module, aes: dict[str, ConceptAutoencoder], ds: ImageDataset, spec: InputSpec,
                      layers: Sequence[str], edges: dict[str, np.ndarray], typical: dict[str, np.ndarray],
                      batch_size: int = 250, progress: bool = True) -> Interventions:
    """Set every concept's code to every state's typical value on every image of ``ds``, decode,
    run the rest of the classifier and record what the later concepts and the prediction do."""
    layers = tuple(layers)
    n = len(ds)
    ks = [edges[l].shape[0] for l in layers]
    s_count = edges[layers[0]].shape[1] + 1
    states = [{j: np.zeros((ks[i], s_count, n, ks[j]), np.int8) for j in range(i, len(layers))}
              for i in range(len(layers))]
    values = [{j: np.zeros((ks[i], s_count, n, ks[j]), np.float32) for j in range(i, len(layers))}
              for i in range(len(layers))]
    ys = [np.zeros((k, s_count, n), np.int64) for k in ks]
    ps = [np.zeros((k, s_count, n)) for k in ks]
    observed = {l: np.zeros((n, k), np.int64) for l, k in zip(layers, ks)}
    observed_values = {l: np.zeros((n, k), np.float32) for l, k in zip(layers, ks)}
    y_obs = np.zeros(n, np.int64)
    p_null = np.zeros((len(layers), n))
    total = -(-n // batch_size) * sum(k * s_count for k in ks)
    bar = tqdm(total=total, desc="interventions", disable=not progress, unit="pass")
    start = 0
    splices: dict[str, Splice] = {}
    for x, _ in batches(ds, spec, batch_size, device=device_of(model)):
        rows = slice(start, start + len(x))
        start += len(x)
        splices = splices or _splices(model, layers, x)
        logits, acts = capture(model, layers, x)
        pred = logits.argmax(1)
        y_obs[rows] = to_numpy(pred)
        codes = {l: aes[l].encoder(acts[l]) for l in layers}
        for i, l in enumerate(layers):
            observed_values[l][rows] = pooled_values(to_numpy(codes[l]))
            observed[l][rows] = discretise(observed_values[l][rows], edges[l])
            unchanged = splices[l].logits(x, aes[l].decoder(codes[l]))
            p_null[i, rows] = to_numpy(F.softmax(unchanged, dim=1).gather(1, pred[:, None])[:, 0])
        for i, l in enumerate(layers):
            for c in range(ks[i]):
                for s in range(s_count):
                    zz = set_code_peak(codes[l], c, float(typical[l][c, s]))
                    out, later = splices[l].capture(x, aes[l].decoder(zz), layers[i + 1:])
                    ys[i][c, s, rows] = to_numpy(out.argmax(1))
                    ps[i][c, s, rows] = to_numpy(F.softmax(out, dim=1).gather(1, pred[:, None])[:, 0])
                    v_here = pooled_values(to_numpy(zz))
                    values[i][i][c, s, rows] = v_here
                    st = observed[l][rows].copy()
                    st[:, c] = s
                    states[i][i][c, s, rows] = st
                    for j in range(i + 1, len(layers)):
                        v = pooled_values(to_numpy(aes[layers[j]].encoder(later[layers[j]])))
                        values[i][j][c, s, rows] = v
                        states[i][j][c, s, rows] = discretise(v, edges[layers[j]])
                    bar.update(1)
    bar.close()
    return Interventions(layers, states, values, ys, ps, observed, y_obs, p_null, observed_values)


def fit_network(observed: dict[str, np.ndarray], observed_values: dict[str, np.ndarray], y: np.ndarray,
                num_classes: int, iv: Interventions, cfg: ConceptConfig
                ) -> tuple[CompiledCausalModel, dict[str, np.ndarray], dict[str, Any]]:
    """Structure and tables of the concept network from observational rows (``observed``:
    layer -> (N, K) states, ``observed_values`` the pooled values, ``y`` (N,) predictions)
    plus the interventional rows of ``iv`` (see :mod:`export.causal_fit`).

    Returns the compiled network, each node's support (rows per parent configuration) and a
    structure report.
    """
    from export.causal_fit import choose_structure, fit_tables
    layers = list(cfg.layers)
    ids = {l: [concept_id(l, c) for c in range(observed[l].shape[1])] for l in layers}
    reacting = {i: iv.change_of_prediction(i) for i in range(len(layers))}
    influence = [iv.influence(i, observed_values[layers[i + 1]].std(axis=0)) for i in range(len(layers) - 1)]
    structure = choose_structure(ids, layers, reacting, influence, cfg, OUTCOME)
    cpts, support, rows_interventional = fit_tables(ids, layers, structure.parents, observed, y, iv.states, iv.y,
                                                    num_classes, cfg, OUTCOME)
    info = {"rows_observational": int(len(y)), "rows_interventional": rows_interventional,
            "intervention_images": int(len(iv.y_observed)),
            "edges_added_for_a_path_to_y": structure.added_for_paths,
            "reacting_concepts": int(sum((r >= cfg.reacting_threshold).sum() for r in reacting.values())),
            "change_of_prediction": {layers[i]: [round(float(v), 5) for v in r] for i, r in reacting.items()}}
    return CompiledCausalModel(cpts, OUTCOME), support, info


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation, None where either side is constant or too short."""
    from scipy.stats import spearmanr
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def causal_validity(iv: Interventions, bn: CompiledCausalModel, cfg: ConceptConfig,
                    support: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Rank agreement between the network's effects and effects measured in the real classifier.

    ``iv``: :func:`run_interventions` on held-out images, so for each image, concept and
    state, P(prediction | do(concept = state)) of the real classifier (code rescaled to the
    state's typical peak, decoded, f_{>l} run). The measured effect uses the same weights
    pi(x) as the network's: ``P_t(x_o) - sum_x pi(x) P_t(x)``, target t = the prediction.
    Spearman correlations: pooled over (image, concept) pairs, per image (over its concepts,
    the ranking a reader sees; mean over images), over per-concept mean effects, per layer.
    With ``support`` (rows per parent configuration per node): the share of served
    interventions whose directly affected tables (X's children, and Y when X is its parent)
    are read at a parent configuration no fitting row had.
    """
    layers = list(iv.layers)
    n = len(iv.y_observed)
    target = iv.y_observed
    evidence = [evidence_row(iv.observed, i) for i in range(n)]
    work = [(li, l, c) for li, l in enumerate(layers) for c in range(iv.observed[l].shape[1])]
    bn_effect = np.zeros((n, len(work)))
    measured = measured_effects(iv, *served_weights(iv, bn))
    unseen = np.zeros((n, len(work), cfg.states), bool)
    for w, (_li, l, c) in enumerate(work):
        cid = concept_id(l, c)
        direct = list(bn.children[cid])
        for i in range(n):
            pi = bn.prior(evidence[i], cid)
            xo = evidence[i][cid]
            rec = bn.interventions(evidence[i], cid)[:, target[i]]
            bn_effect[i, w] = rec[xo] - float(pi @ rec)
            if support is not None:
                for s in range(cfg.states):
                    ev = {**evidence[i], cid: s}
                    unseen[i, w, s] = any(support[ch][tuple(ev[p] for p in bn.cpts[ch].parents)] == 0
                                          for ch in direct)
    layer_of = np.array([l for _, l, _ in work])
    ids = [concept_id(l, c) for _, l, c in work]
    connected = np.array([bn.outcome in bn.descendants(cid) for cid in ids])
    per_image = [_spearman(bn_effect[i], measured[i]) for i in range(n)]
    per_image_valid = [r for r in per_image if r is not None]
    moving = np.abs(measured).mean(axis=0) >= cfg.reacting_threshold
    out = {"spearman": _spearman(bn_effect.ravel(), measured.ravel()),
           "spearman_per_image_mean": float(np.mean(per_image_valid)) if per_image_valid else None,
           "images_with_constant_effects": int(n - len(per_image_valid)),
           "spearman_per_concept": _spearman(bn_effect.mean(axis=0), measured.mean(axis=0)),
           "spearman_per_layer": {l: _spearman(bn_effect[:, layer_of == l].ravel(), measured[:, layer_of == l].ravel())
                                  for l in layers},
           "pairs": int(bn_effect.size), "images": n,
           "concepts_connected_to_outcome": int(connected.sum()),
           "moving_concepts_without_path": [cid for cid, m, con in zip(ids, moving, connected) if m and not con],
           "bn_effect_mean_abs": float(np.abs(bn_effect).mean()),
           "measured_effect_mean_abs": float(np.abs(measured).mean())}
    if support is not None:
        out["interventions_on_unseen_configurations"] = float(unseen.mean())
    return out


def config_dict(cfg: ConceptConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["layers"] = list(cfg.layers)
    return d


def served_weights(iv: Interventions, bn: CompiledCausalModel) -> tuple[np.ndarray, np.ndarray]:
    """The weights ``pi`` (N, C, S) the served answers use on the images of ``iv`` and their
    observed states (N, C), concepts in layer order."""
    ids = [concept_id(l, c) for l in iv.layers for c in range(iv.observed[l].shape[1])]
    n = len(iv.y_observed)
    evidence = [evidence_row(iv.observed, i) for i in range(n)]
    pi = np.array([[bn.prior(evidence[i], cid) for cid in ids] for i in range(n)])
    observed = np.array([[evidence[i][cid] for cid in ids] for i in range(n)])
    return pi, observed


def measured_effects(iv: Interventions, pi: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """The network's effect of every concept on every image of ``iv``: (N, C), concepts in
    layer order, ``P_t(x_o) - sum_x pi(x) P_t(x)`` with the served weights ``pi`` (N, C, S)
    and observed states (N, C) of :func:`served_weights`."""
    from handlers.runtime.faithfulness import effects
    return effects(iv.measured_p(), pi, observed)


#: A layer's network answers may interpolate states when the interpolation's mean |effect
#: error| on the training interventions is at most this share of the layer's noise floor.
PROBE_ERROR_SHARE = 0.5


def choose_probes(iv: Interventions, pi: np.ndarray, observed: np.ndarray, typical: dict[str, np.ndarray],
                  share: float = PROBE_ERROR_SHARE) -> tuple[dict[str, int], dict[str, Any]]:
    """Per concept layer, at how many states the network must be run for its answers to stay
    true: the smallest number P (1..S) whose interpolated answers
    (:func:`~handlers.runtime.concepts.interpolate_states` through the unchanged code and the
    P states farthest from the observed peak) differ from the network's answer at every state
    by a mean |effect| of at most ``share`` times the layer's noise floor, measured on the
    training images of ``iv`` (pi (N, C, S), observed (N, C) as :func:`served_weights`).

    The noise floor is that of the held-out report: mean |P(target) with the layer's
    autoencoder spliced in unchanged - P(target | do(c = its observed state's typical value))|.
    Returns ({layer: P}, a report per layer: the floor and each P's errors)."""
    from export.causal_truth import noise_floor
    from handlers.runtime.concepts import interpolate_states, probe_states
    from handlers.runtime.faithfulness import effects
    chosen: dict[str, int] = {}
    report: dict[str, Any] = {"error_share_of_noise_floor": share, "layers": {}}
    layer_of = [l for l in iv.layers for _ in range(iv.observed[l].shape[1])]
    floors = noise_floor(iv.p_null.T, iv.measured_p(), observed, layer_of)
    start = 0
    for i, layer in enumerate(iv.layers):
        p = iv.p_pred[i].transpose(2, 0, 1)  # (N, K, S)
        n, k, s = p.shape
        cols = slice(start, start + k)
        start += k
        anchor, peaks, obs = iv.p_null[i], iv.observed_values[layer].astype(np.float64), observed[:, cols]
        exact = effects(p, pi[:, cols], obs)
        floor = floors[layer]
        rows: dict[str, Any] = {}
        chosen[layer] = s
        for probes in range(1, s):
            approx = np.empty_like(p)
            for img in range(n):
                probed = probe_states(typical[layer], peaks[img], probes)
                approx[img] = interpolate_states(typical[layer], peaks[img], float(anchor[img]), probed,
                                                 np.take_along_axis(p[img], probed, axis=1))
            err = float(np.abs(effects(approx, pi[:, cols], obs) - exact).mean())
            rows[str(probes)] = {"effect_mae": round(err, 6), "mae_p": round(float(np.abs(approx - p).mean()), 6)}
            if err <= share * floor:
                chosen[layer] = probes
                break
        report["layers"][layer] = {"noise_floor": round(floor, 6), "probes": chosen[layer], "tried": rows}
    return chosen, report


def _export_layer(model: nn.Module, ae: ConceptAutoencoder, layer: str, spec: InputSpec, k: int,
                  out: Path) -> tuple[str, str, str, float]:
    """Encoder, decoder and intervention graph (decoder + rest of the classifier) of one
    layer as ONNX files in ``out``: their names and the worst onnxruntime-vs-torch difference."""
    from export.onnx_export import export_intervention_graph, export_module, module_parity
    with torch.no_grad():
        _, acts = capture(model, [layer], torch.zeros(1, spec.channels, spec.height, spec.width,
                                                      device=device_of(model)))
    a_shape = tuple(acts[layer].shape[1:])
    z_shape = (k, *a_shape[1:])
    safe = layer.replace(".", "_")
    enc_file, dec_file = f"concept_encoder_{safe}.onnx", f"concept_decoder_{safe}.onnx"
    iv_file = f"concept_interventions_{safe}.onnx"
    export_module(ae.encoder, torch.zeros(2, *a_shape), out / enc_file, "activation", "code")
    export_module(ae.decoder, torch.zeros(2, *z_shape), out / dec_file, "code", "activation")
    worst = max(module_parity(ae.encoder, out / enc_file, a_shape, nonneg=True),
                module_parity(ae.decoder, out / dec_file, z_shape, nonneg=True),
                export_intervention_graph(model, ae.decoder, layer, spec, z_shape, out / iv_file))
    if worst > 1e-4:
        raise RuntimeError(f"concept autoencoder {layer}: onnxruntime differs from torch by {worst:.2e}")
    return enc_file, dec_file, iv_file, worst


def _served_explainer(spec_layers: Sequence[Any], compiled: CompiledCausalModel, cfg: ConceptConfig,
                      out: Path) -> Any:
    """The serving code's concepts view over the ONNX files just written to ``out``."""
    from handlers.runtime.classifier import make_session
    from handlers.runtime.concept_view import ConceptExplainer
    from handlers.runtime.concepts import ConceptSpec

    def session(name: str) -> Any:
        return make_session(out / name, ["CPUExecutionProvider"], 1)
    spec = ConceptSpec(cfg.states, tuple(spec_layers), "causal_network.json", OUTCOME, {})
    return ConceptExplainer(spec, compiled, {l.layer: session(l.encoder_file) for l in spec_layers},
                            {l.layer: session(l.intervention_file) for l in spec_layers})


def served_truth(model: nn.Module, explainer: Any, held_out: ImageDataset, spec: InputSpec,
                 iv: Interventions, network_concepts: int | None) -> dict[str, Any]:
    """The effect-unit report (:func:`export.causal_truth.effect_truth`) of what the serving
    code answers on ``held_out`` with ``network_concepts``, against the network's own
    interventions ``iv`` on the same images; also the Bayesian network alone and the network
    answering every concept, as diagnostics."""
    from export.causal_truth import effect_truth, served_table
    _, activations = pooled_activations(model, [], held_out, spec, keep_raw=list(iv.layers))
    batch = explainer.encode(activations)
    targets, measured_p, null_p = iv.y_observed, iv.measured_p(), iv.p_null.T
    served = served_table(explainer, batch, targets, network_concepts)
    bayesian = served_table(explainer, batch, targets, 0)
    report = effect_truth(served, measured_p, null_p, bayesian)
    everything = served_table(explainer.every_state(), batch, targets, None)
    # only the answer's own metrics are kept, so one shuffled baseline run is enough here
    report["network_answers_every_concept"] = effect_truth(everything, measured_p, null_p, shuffles=1)["answer"]
    report["network_concepts"] = explainer.num_concepts if network_concepts is None else network_concepts
    return report


@dataclass(frozen=True)
class _Variables:
    """The concept variables of the training and held-out images: encoder outputs, quantile
    bin edges (layer -> (K, S-1)), states (layer -> (N, K)) and each state's typical value."""

    train: Any
    test: Any
    edges: dict[str, np.ndarray]
    states_train: dict[str, np.ndarray]
    states_test: dict[str, np.ndarray]
    typical: dict[str, np.ndarray]


def _concept_variables(model: nn.Module, aes: Any, train: ImageDataset, test: ImageDataset, spec: InputSpec,
                       cfg: ConceptConfig, progress: bool) -> _Variables:
    """Encode both sets, fit the bins on the training set and discretise both."""
    enc_train = encode_dataset(model, aes, train, spec, cfg.layers, progress=progress)
    enc_test = encode_dataset(model, aes, test, spec, cfg.layers, agreement=True, progress=progress)
    edges = {l: fit_edges(enc_train.values[l], cfg.states) for l in cfg.layers}
    st_train = {l: discretise(enc_train.values[l], edges[l]) for l in cfg.layers}
    st_test = {l: discretise(enc_test.values[l], edges[l]) for l in cfg.layers}
    typical = {l: typical_values(enc_train.values[l], st_train[l], edges[l]) for l in cfg.layers}
    return _Variables(enc_train, enc_test, edges, st_train, st_test, typical)


def _fit_and_save_network(model: nn.Module, aes: Any, train: ImageDataset, spec: InputSpec, cfg: ConceptConfig,
                          v: _Variables, out: Path, progress: bool) -> tuple[CompiledCausalModel, Any, Any, dict[str, Any]]:
    """Interventions on a sample of training images, the network fitted on them and the
    observational rows, saved as ``causal_network.json`` (checked to round-trip). Returns the
    network, its support, the interventions and a report (structure and seconds)."""
    t_bn = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    iv_idx = np.sort(rng.permutation(len(train))[: cfg.intervention_images])
    iv = run_interventions(model, aes, train.take(iv_idx), spec, cfg.layers, v.edges, v.typical, progress=progress)
    iv_seconds = time.perf_counter() - t_bn
    compiled, support, structure = fit_network(v.states_train, v.train.values, v.train.logits.argmax(1),
                                               v.train.logits.shape[1], iv, cfg)
    bn_seconds = time.perf_counter() - t_bn
    compiled.save(out / "causal_network.json")
    if not np.array_equal(CompiledCausalModel.from_file(out / "causal_network.json").cpts[OUTCOME].table,
                          compiled.cpts[OUTCOME].table):
        raise RuntimeError("causal network JSON does not round-trip")
    report = {"nodes": len(compiled.cpts), "edges": int(sum(len(c.parents) for c in compiled.cpts.values())),
              "outcome_parents": list(compiled.cpts[OUTCOME].parents), "fit_seconds": round(bn_seconds, 1),
              "intervention_seconds": round(iv_seconds, 1), "train_images": len(train),
              "tables": "logistic on one-hot parent states, backed off with configuration counts", **structure}
    return compiled, support, iv, report


def _export_concept_layers(model: nn.Module, aes: Any, spec: InputSpec, cfg: ConceptConfig, v: _Variables,
                           screen: np.ndarray, probes: dict[str, int], activation_names: dict[str, str], out: Path
                           ) -> tuple[list[Any], dict[str, float]]:
    """Each layer's encoder, decoder and intervention graphs (ONNX, with their parity) and its
    :class:`~handlers.runtime.concepts.ConceptLayer` (bins, typical values, training state
    shares, screening scores, network probes)."""
    from handlers.runtime.concepts import ConceptLayer
    layers, parity, start = [], {}, 0
    for l in cfg.layers:
        enc_file, dec_file, iv_file, parity[l] = _export_layer(model, aes[l], l, spec, cfg.k, out)
        baseline = np.stack([np.bincount(v.states_train[l][:, c], minlength=cfg.states) / len(v.states_train[l])
                             for c in range(cfg.k)])
        layers.append(ConceptLayer(l, activation_names[l], enc_file, dec_file, v.edges[l], v.typical[l],
                                   (None,) * cfg.k, (None,) * cfg.k, baseline, iv_file, screen[start:start + cfg.k],
                                   probes[l]))
        start += cfg.k
    return layers, parity


def build_concepts(model: nn.Module, spec: InputSpec, train: ImageDataset, test: ImageDataset,
                   activation_names: dict[str, str], out: Path, cfg: ConceptConfig,
                   progress: bool = True, kinds: dict[str, dict] | None = None) -> dict[str, Any]:
    """Everything of method 1 into folder ``out``: encoder, decoder and intervention ONNX
    files, causal network JSON, concepts.json with bins, names, the atlas and the validity
    report. Names come from the training images (their class and, where ``train`` has
    factors, the factors, whose kinds ``kinds`` gives: :mod:`export.naming`). Returns the
    report."""
    from export.atlas import build_atlas
    from export.naming import name_concepts
    from handlers.runtime.concepts import ConceptSpec
    from handlers.runtime.settings import HandlerSettings
    t0 = time.perf_counter()
    aes, train_log = train_autoencoders(model, train, spec, cfg, progress)
    v = _concept_variables(model, aes, train, test, spec, cfg, progress)
    compiled, support, iv, network = _fit_and_save_network(model, aes, train, spec, cfg, v, out, progress)
    y_test = v.test.logits.argmax(1)
    fidelity = float(np.mean([compiled.outcome_posterior(evidence_row(v.states_test, i)).argmax() == y_test[i]
                              for i in range(len(test))]))
    val_idx = np.linspace(0, len(test) - 1, min(cfg.validity_images, len(test))).round().astype(int)
    iv_test = run_interventions(model, aes, test.take(val_idx), spec, cfg.layers, v.edges, v.typical,
                                progress=progress)
    validity = causal_validity(iv_test, compiled, cfg, support)
    pi, observed = served_weights(iv, compiled)
    screen = np.abs(measured_effects(iv, pi, observed)).mean(axis=0)
    probes, probe_report = choose_probes(iv, pi, observed, v.typical)
    t_atlas = time.perf_counter()
    atlases = build_atlas(model, {l: aes[l].encoder for l in cfg.layers}, train, spec, v.train.values,
                          v.train.peaks, v.train.map_shapes, v.typical, out, cfg.atlas_images
                          ) if cfg.atlas_images > 0 else {}
    atlas_seconds = time.perf_counter() - t_atlas
    layers, parity = _export_concept_layers(model, aes, spec, cfg, v, screen, probes, activation_names, out)
    names = {l: name_concepts(v.train.values[l], train.labels, train.classes, train.factors, kinds)
             for l in cfg.layers}
    layers = [replace(l, atlas=atlases.get(l.layer), names=tuple(n.name for n in names[l.layer]),
                      name_bits=tuple(n.bits for n in names[l.layer])) for l in layers]
    explainer = _served_explainer(layers, compiled, cfg, out)
    truth = served_truth(model, explainer, test.take(val_idx), spec, iv_test, HandlerSettings().network_concepts)
    report = {
        "config": config_dict(cfg),
        "autoencoders": {**train_log, "onnx_parity_max_abs_diff": parity},
        "agreement": v.test.agreement,
        "fidelity": fidelity,
        "causal_validity": validity,
        "effect_truth": truth,
        "network_probes": probe_report,
        "network": network,
        "names": {l: [n.to_json() for n in names[l]] for l in cfg.layers},
        "mostly_silent_concepts": {l: int((v.edges[l][:, -1] <= 0).sum()) for l in cfg.layers},
        "held_out_images": len(test),
        "atlas": {"seconds": round(atlas_seconds, 1), "bytes": sum((out / a.file).stat().st_size for a in atlases.values()),
                  "crop_px": {l: list(a.crop) for l, a in atlases.items()}},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    report["checks"] = validity_checks(report)
    ConceptSpec(cfg.states, tuple(layers), "causal_network.json", OUTCOME, report).save(out / "concepts.json")
    return report


#: Targets a concept bundle must meet to be archived without an explicit override (the
#: effect-unit targets are :data:`export.causal_truth.TRUTH_TARGETS`).
TARGETS = {"agreement": 0.97, "fidelity": 0.95}


def validity_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's pass/fail checks: name, measured value, target, passed."""
    from export.causal_truth import truth_checks
    cv = report["causal_validity"]
    checks: list[dict[str, Any]] = []

    def add(name: str, measured: Any, target: str, passed: bool) -> None:
        checks.append({"name": name, "measured": measured, "target": target, "passed": bool(passed)})

    for l, a in report["agreement"].items():
        add(f"agreement {l}", round(a, 4), f">= {TARGETS['agreement']}", a >= TARGETS["agreement"])
    add("fidelity", round(report["fidelity"], 4), f">= {TARGETS['fidelity']}", report["fidelity"] >= TARGETS["fidelity"])
    if "effect_truth" in report:
        for name, measured, target, passed in truth_checks(report["effect_truth"]):
            add(name, None if measured is None else round(measured, 4), target, passed)
    add("moving concepts without a path to Y", len(cv["moving_concepts_without_path"]), "== 0",
        not cv["moving_concepts_without_path"])
    return checks


def failed_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The checks of a concepts report that failed (recomputed for reports without checks)."""
    checks = report.get("checks") or validity_checks(report)
    return [c for c in checks if not c["passed"]]


def format_report(report: dict[str, Any]) -> str:
    """The validity report as a printed table."""
    cv = report["causal_validity"]
    lines = [f"{'check':<44} {'measured':>9}   target", "-" * 66]
    for c in report.get("checks") or validity_checks(report):
        m = "n/a" if c["measured"] is None else c["measured"]
        lines.append(f"{c['name']:<44} {m!s:>9}   {c['target']:<8} {'pass' if c['passed'] else 'FAIL'}")
    if "interventions_on_unseen_configurations" in cv:
        lines.append(f"{'served interventions on unseen configurations':<44} "
                     f"{cv['interventions_on_unseen_configurations']:>9.4f}   (answered by the logistic table)")
    lines.append(f"{'spearman over per-concept mean effects':<44} "
                 f"{'n/a' if cv['spearman_per_concept'] is None else round(cv['spearman_per_concept'], 4)!s:>9}")
    if "network_probes" in report:
        lines += ["", format_probes(report["network_probes"])]
    if "effect_truth" in report:
        from export.causal_truth import format_truth
        lines += ["", format_truth(report["effect_truth"])]
    return "\n".join(lines)


def format_probes(report: dict[str, Any]) -> str:
    """:func:`choose_probes`' report as lines: per layer the states the network is run at, and
    each smaller count's interpolation error against the bound."""
    share = report["error_share_of_noise_floor"]
    lines = [f"network runs per concept (probes), training interventions; bound: interpolated effect error "
             f"<= {share} x the layer's noise floor"]
    for layer, r in report["layers"].items():
        tried = ", ".join(f"{p} probe(s) {t['effect_mae']:.5f}" for p, t in r["tried"].items())
        lines.append(f"  {layer:<10} probes {r['probes']}  noise floor {r['noise_floor']:.5f}  "
                     f"bound {share * r['noise_floor']:.5f}  tried: {tried or 'none'}")
    return "\n".join(lines)


def to_pgmpy(compiled: CompiledCausalModel):
    """The saved network as a pgmpy DiscreteBayesianNetwork (for checks and benchmarks)."""
    from pgmpy.factors.discrete import TabularCPD
    from pgmpy.models import DiscreteBayesianNetwork
    model = DiscreteBayesianNetwork()
    model.add_nodes_from(compiled.order)
    model.add_edges_from([(p, n) for n in compiled.order for p in compiled.cpts[n].parents])
    for n in compiled.order:
        c = compiled.cpts[n]
        cards = [compiled.cpts[p].card for p in c.parents]
        model.add_cpds(TabularCPD(n, c.card, c.table.reshape(c.card, -1), evidence=list(c.parents) or None,
                                  evidence_card=cards or None,
                                  state_names={v: list(compiled.cpts[v].states) for v in [n, *c.parents]}))
    model.check_model()
    return model
