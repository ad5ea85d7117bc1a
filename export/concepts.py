"""Method 1 offline: concept autoencoders, discretisation, the Bayesian network, validity.

Harradon, Druce & Ruttenberg (2018): at each chosen layer an autoencoder turns the
activations into K concept maps; each concept is pooled (spatial max) and discretised into
S states; a Bayesian network over the concepts and the network's predicted class ``Y`` is
learned with edges only from one concept layer to the next and from the last to ``Y``.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from export.data.loader import ImageDataset
from export.train import batches, one_cycle
from handlers.runtime.causal import CompiledCausalModel
from handlers.runtime.concepts import concept_id, discretise, fit_edges, pooled_values
from handlers.runtime.imaging import InputSpec, normalize

log = logging.getLogger(__name__)
OUTCOME = "Y"


@dataclass(frozen=True)
class ConceptConfig:
    """Settings of the concept pipeline (defaults chosen for the demo network)."""

    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    k: int = 8
    states: int = 3
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-2
    deep_weight: float = 0.1
    deep_warmup_epochs: int = 1  # deep loss weight ramps linearly from 0 over these epochs
    hidden_multiplier: float = 2.0  # autoencoder hidden width = multiplier x layer channels
    sparsity_weight: float = 0.02
    tv_weight: float = 0.0
    train_images: int = 6000
    max_indegree: int = 3
    outcome_max_indegree: int = 6
    equivalent_sample_size: float = 10.0
    validity_images: int = 300
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


def capture(model: nn.Module, layers: Sequence[str], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass returning logits and the outputs of ``layers``."""
    modules = dict(model.named_modules())
    acts: dict[str, torch.Tensor] = {}
    handles = [modules[l].register_forward_hook(lambda _m, _i, o, l=l: acts.__setitem__(l, o)) for l in layers]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, acts


@torch.no_grad()
def pooled_activations(model: nn.Module, layers: Sequence[str], ds: ImageDataset, spec: InputSpec,
                       keep_raw: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per layer, the globally average-pooled output as float64 (N, C) (vectors are flattened),
    and for the layers in ``keep_raw`` only, the raw activations (N, C, H, W)."""
    pooled: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    raw: dict[str, list[np.ndarray]] = {l: [] for l in keep_raw}
    for x, _ in batches(ds, spec, 256):
        _, acts = capture(model, list(dict.fromkeys([*layers, *keep_raw])), x)
        for l in layers:
            a = acts[l]
            pooled[l].append((a.mean(dim=(2, 3)) if a.ndim == 4 else a.reshape(a.shape[0], -1)).numpy())
        for l in keep_raw:
            raw[l].append(acts[l].numpy())
    return ({l: np.concatenate(v).astype(np.float64) for l, v in pooled.items()},
            {l: np.concatenate(v) for l, v in raw.items()})


def spliced_logits(model: nn.Module, layer: str, x: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """Logits of the network with ``layer``'s output replaced by ``replacement`` (f_{>l})."""
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, _o: replacement)
    try:
        return model(x)
    finally:
        handle.remove()


def _tv(z: torch.Tensor) -> torch.Tensor:
    return (z[:, :, 1:, :] - z[:, :, :-1, :]).abs().mean() + (z[:, :, :, 1:] - z[:, :, :, :-1]).abs().mean()


def train_autoencoders(model: nn.Module, ds: ImageDataset, spec: InputSpec, cfg: ConceptConfig,
                       progress: bool = True) -> tuple[dict[str, ConceptAutoencoder], dict[str, Any]]:
    """Train one autoencoder per layer with shallow + deep (KL) reconstruction + L1 sparsity.

    The classifier stays frozen. Returns the autoencoders (eval mode) and a training log.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    idx = rng.permutation(len(ds))[: cfg.train_images]
    with torch.no_grad():
        _, acts0 = capture(model, cfg.layers, torch.from_numpy(normalize(ds.pixels[idx[:256]], spec)))
    aes: dict[str, ConceptAutoencoder] = {}
    scale: dict[str, float] = {}
    for l in cfg.layers:
        a = acts0[l]
        if a.ndim != 4:
            raise ValueError(f"concept layer {l} must have (N, C, H, W) activations, got {tuple(a.shape)}")
        hidden = max(int(round(cfg.hidden_multiplier * a.shape[1])), 2 * cfg.k)
        aes[l] = ConceptAutoencoder(a.shape[1], cfg.k, hidden=hidden, nonneg=bool((a >= 0).all()))
        scale[l] = float(a.pow(2).mean()) + 1e-8
    params = [p for ae in aes.values() for p in ae.parameters()]
    steps = cfg.epochs * -(-len(idx) // cfg.batch_size)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = one_cycle(opt, cfg.lr, steps, 0.2)
    history: list[dict[str, float]] = []
    bar = tqdm(total=steps, desc="concept autoencoders", disable=not progress, unit="step")
    sub = ds.take(idx)
    t0 = time.perf_counter()
    steps_per_epoch = -(-len(idx) // cfg.batch_size)
    step = 0
    for epoch in range(cfg.epochs):
        sums = {f"{l}/{t}": 0.0 for l in cfg.layers for t in ("shallow", "deep", "sparse")}
        n = 0
        for x, _ in batches(sub, spec, cfg.batch_size, rng.permutation(len(sub))):
            with torch.no_grad():
                logits, acts = capture(model, cfg.layers, x)
                logp = F.log_softmax(logits, dim=1)
            ramp = min(1.0, step / max(cfg.deep_warmup_epochs * steps_per_epoch, 1))
            step += 1
            loss = torch.zeros(())
            for l in cfg.layers:
                z, rec = aes[l](acts[l])
                shallow = F.mse_loss(rec, acts[l]) / scale[l]
                deep = F.kl_div(F.log_softmax(spliced_logits(model, l, x, rec), dim=1), logp,
                                log_target=True, reduction="batchmean")
                sparse = z.abs().mean() / np.sqrt(scale[l])
                loss = loss + shallow + ramp * cfg.deep_weight * deep + cfg.sparsity_weight * sparse
                if cfg.tv_weight:
                    loss = loss + cfg.tv_weight * _tv(z)
                sums[f"{l}/shallow"] += float(shallow.detach())
                sums[f"{l}/deep"] += float(deep.detach())
                sums[f"{l}/sparse"] += float(sparse.detach())
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
    return aes, {"history": history, "seconds": round(time.perf_counter() - t0, 1), "images": len(idx)}


@dataclass
class Encoded:
    """Per image: logits (N, K) of the original network and pooled concept values per layer (N, K_l)."""

    logits: np.ndarray
    values: dict[str, np.ndarray]
    agreement: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def encode_dataset(model: nn.Module, aes: dict[str, ConceptAutoencoder], ds: ImageDataset, spec: InputSpec,
                   layers: Sequence[str], agreement: bool = False, batch_size: int = 256,
                   progress: bool = True) -> Encoded:
    """Logits and pooled concept values; with ``agreement``, also the top-1 agreement of the
    network with each autoencoder spliced in (methods.md check 1)."""
    logits_all, values = [], {l: [] for l in layers}
    agree = {l: 0 for l in layers}
    for x, _ in tqdm(batches(ds, spec, batch_size), total=-(-len(ds) // batch_size), desc="encode",
                     disable=not progress, unit="batch"):
        logits, acts = capture(model, layers, x)
        logits_all.append(logits.numpy())
        for l in layers:
            z, rec = aes[l](acts[l])
            values[l].append(pooled_values(z.numpy()))
            if agreement:
                agree[l] += int((spliced_logits(model, l, x, rec).argmax(1) == logits.argmax(1)).sum())
    out = Encoded(np.concatenate(logits_all), {l: np.concatenate(v) for l, v in values.items()})
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


def structure_search(data: pd.DataFrame, layer_nodes: Sequence[Sequence[str]], cfg: ConceptConfig,
                     state_names: dict[str, list[int]]) -> list[tuple[str, str]]:
    """Parents of every node chosen by greedy BDeu score search under the layer constraints.

    Allowed edges: concept layer i -> layer i+1, last layer -> Y; at most ``max_indegree``
    parents (``outcome_max_indegree`` for Y). Under these constraints every parent set is
    acyclic, so the network score decomposes per node and the search adds, for each node,
    the allowed parent that raises pgmpy's BDeu local score most, until none does.
    """
    from pgmpy.structure_score import BDeu
    score = BDeu(data, equivalent_sample_size=cfg.equivalent_sample_size, state_names=state_names)
    targets = [(n, list(layer_nodes[i - 1]), cfg.max_indegree)
               for i in range(1, len(layer_nodes)) for n in layer_nodes[i]]
    targets.append((OUTCOME, list(layer_nodes[-1]), cfg.outcome_max_indegree))
    edges = []
    for node, candidates, cap in tqdm(targets, desc="structure search", unit="node"):
        parents: list[str] = []
        best = score.local_score(node, tuple())
        while len(parents) < cap:
            scored = [(score.local_score(node, tuple(parents + [c])), c) for c in candidates if c not in parents]
            if not scored:
                break
            s, c = max(scored)
            if s <= best:
                break
            best, parents = s, parents + [c]
        edges += [(p, node) for p in parents]
    return edges


def fit_network(states: dict[str, np.ndarray], y: np.ndarray, num_classes: int, cfg: ConceptConfig):
    """Learn structure and BDeu-smoothed CPDs; returns a fitted pgmpy DiscreteBayesianNetwork."""
    from pgmpy.models import DiscreteBayesianNetwork
    from pgmpy.parameter_estimator import DiscreteBayesianEstimator
    cols: dict[str, np.ndarray] = {}
    layer_nodes = []
    for l in cfg.layers:
        ids = [concept_id(l, c) for c in range(states[l].shape[1])]
        layer_nodes.append(ids)
        for c, cid in enumerate(ids):
            cols[cid] = states[l][:, c]
    cols[OUTCOME] = y
    data = pd.DataFrame(cols)
    state_names = {n: list(range(cfg.states)) for n in cols if n != OUTCOME}
    state_names[OUTCOME] = list(range(num_classes))
    edges = structure_search(data, layer_nodes, cfg, state_names)
    model = DiscreteBayesianNetwork()
    model.add_nodes_from(list(cols))
    model.add_edges_from(edges)
    est = DiscreteBayesianEstimator(state_names=state_names, prior_type="BDeu",
                                    equivalent_sample_size=cfg.equivalent_sample_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data, estimator=est)
    model.check_model()
    return model


@torch.no_grad()
def causal_validity(model: nn.Module, aes: dict[str, ConceptAutoencoder], ds: ImageDataset, spec: InputSpec,
                    cfg: ConceptConfig, bn: CompiledCausalModel, edges: dict[str, np.ndarray],
                    typical: dict[str, np.ndarray], progress: bool = True) -> dict[str, Any]:
    """Spearman correlation between the BN's effects and effects measured in the real network.

    For each held-out image, concept (layer l, channel c) and state s: scale channel c of
    the code so its spatial max equals the state's typical value (a flat map if the channel
    is silent), decode, run f_{>l}, and read P(target). The measured effect uses the same
    weights pi(x) as the BN's: ``P_t(x_o) - sum_x pi(x) P_t(x)``.
    """
    from scipy.stats import spearmanr
    n = min(cfg.validity_images, len(ds))
    idx = np.linspace(0, len(ds) - 1, n).round().astype(int)
    x = next(batches(ds.take(idx), spec, n))[0]
    logits, acts = capture(model, cfg.layers, x)
    target = logits.argmax(1).numpy()
    codes = {l: aes[l].encoder(acts[l]) for l in cfg.layers}
    states = {l: discretise(pooled_values(codes[l].numpy()), edges[l]) for l in cfg.layers}
    evidence = [{concept_id(l, c): int(states[l][i, c]) for l in cfg.layers for c in range(states[l].shape[1])}
                for i in range(n)]
    bn_effect, measured, pair_layer, pair_connected = [], [], [], []
    rows = np.arange(n)
    work = [(l, c) for l in cfg.layers for c in range(codes[l].shape[1])]
    for l, c in tqdm(work, desc="causal validity", disable=not progress, unit="concept"):
        z = codes[l]
        peak = z[:, c].amax(dim=(1, 2))
        p_t = np.zeros((n, cfg.states))
        for s in range(cfg.states):
            zz = z.clone()
            value = float(typical[l][c, s])
            live = peak > 1e-6
            zz[live, c] = z[live, c] * (value / peak[live])[:, None, None]
            zz[~live, c] = value
            probs = F.softmax(spliced_logits(model, l, x, aes[l].decoder(zz)), dim=1).numpy()
            p_t[:, s] = probs[rows, target]
        cid = concept_id(l, c)
        for i in range(n):
            pi = bn.prior(evidence[i], cid)
            xo = evidence[i][cid]
            measured.append(p_t[i, xo] - float(pi @ p_t[i]))
            rec = bn.interventions(evidence[i], cid)[:, target[i]]
            bn_effect.append(rec[xo] - float(pi @ rec))
            pair_layer.append(l)
            pair_connected.append(bn.outcome in bn.descendants(cid))
    bn_effect_a, measured_a = np.asarray(bn_effect), np.asarray(measured)
    layer_a, conn_a = np.asarray(pair_layer), np.asarray(pair_connected)
    rho = spearmanr(bn_effect_a, measured_a).statistic
    per_layer = {l: float(spearmanr(bn_effect_a[layer_a == l], measured_a[layer_a == l]).statistic)
                 for l in cfg.layers}
    connected = float(spearmanr(bn_effect_a[conn_a], measured_a[conn_a]).statistic) if conn_a.sum() > 2 else None
    return {"spearman": float(rho), "pairs": len(measured), "images": n,
            "spearman_per_layer": per_layer, "spearman_connected_concepts": connected,
            "concepts_connected_to_outcome": int(sum(bn.outcome in bn.descendants(x) for x in bn.concepts)),
            "bn_effect_mean_abs": float(np.mean(np.abs(bn_effect))),
            "measured_effect_mean_abs": float(np.mean(np.abs(measured)))}


def config_dict(cfg: ConceptConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["layers"] = list(cfg.layers)
    return d


def build_concepts(model: nn.Module, spec: InputSpec, train: ImageDataset, test: ImageDataset,
                   activation_names: dict[str, str], out: Path, cfg: ConceptConfig,
                   progress: bool = True) -> dict[str, Any]:
    """Everything of method 1 into folder ``out``: encoder/decoder ONNX files, causal network
    JSON, concepts.json with bins and the validity report. Returns the report."""
    from export.onnx_export import export_module, module_parity
    from handlers.runtime.concepts import ConceptLayer, ConceptSpec
    t0 = time.perf_counter()
    aes, train_log = train_autoencoders(model, train, spec, cfg, progress)
    enc_train = encode_dataset(model, aes, train, spec, cfg.layers, progress=progress)
    enc_test = encode_dataset(model, aes, test, spec, cfg.layers, agreement=True, progress=progress)
    edges = {l: fit_edges(enc_train.values[l], cfg.states) for l in cfg.layers}
    st_train = {l: discretise(enc_train.values[l], edges[l]) for l in cfg.layers}
    st_test = {l: discretise(enc_test.values[l], edges[l]) for l in cfg.layers}
    typical = {l: typical_values(enc_train.values[l], st_train[l], edges[l]) for l in cfg.layers}
    y_train = enc_train.logits.argmax(1)
    num_classes = enc_train.logits.shape[1]
    t_bn = time.perf_counter()
    bn_model = fit_network(st_train, y_train, num_classes, cfg)
    compiled = CompiledCausalModel.from_pgmpy(bn_model, outcome=OUTCOME)
    bn_seconds = time.perf_counter() - t_bn
    compiled.save(out / "causal_network.json")
    if not np.array_equal(CompiledCausalModel.from_file(out / "causal_network.json").cpts[OUTCOME].table,
                          compiled.cpts[OUTCOME].table):
        raise RuntimeError("causal network JSON does not round-trip")
    # fidelity: argmax P(Y | concepts) vs the network's prediction, held out
    y_test = enc_test.logits.argmax(1)
    hits = 0
    for i in range(len(test)):
        ev = {concept_id(l, c): int(st_test[l][i, c]) for l in cfg.layers for c in range(cfg.k)}
        hits += int(compiled.outcome_posterior(ev).argmax() == y_test[i])
    fidelity = hits / len(test)
    validity = causal_validity(model, aes, test, spec, cfg, compiled, edges, typical, progress)
    layers, parity = [], {}
    for l in cfg.layers:
        with torch.no_grad():
            _, acts = capture(model, [l], torch.zeros(1, spec.channels, spec.height, spec.width))
        a_shape = tuple(acts[l].shape[1:])
        z_shape = (cfg.k, *a_shape[1:])
        safe = l.replace(".", "_")
        enc_file, dec_file = f"concept_encoder_{safe}.onnx", f"concept_decoder_{safe}.onnx"
        export_module(aes[l].encoder, torch.zeros(2, *a_shape), out / enc_file, "activation", "code")
        export_module(aes[l].decoder, torch.zeros(2, *z_shape), out / dec_file, "code", "activation")
        parity[l] = max(module_parity(aes[l].encoder, out / enc_file, a_shape, nonneg=True),
                        module_parity(aes[l].decoder, out / dec_file, z_shape, nonneg=True))
        if parity[l] > 1e-4:
            raise RuntimeError(f"concept autoencoder {l}: onnxruntime differs from torch by {parity[l]:.2e}")
        baseline = np.stack([np.bincount(st_train[l][:, c], minlength=cfg.states) / len(st_train[l])
                             for c in range(cfg.k)])
        layers.append(ConceptLayer(l, activation_names[l], enc_file, dec_file, edges[l], typical[l],
                                   (None,) * cfg.k, (None,) * cfg.k, baseline))
    dead = {l: int((edges[l][:, -1] <= 0).sum()) for l in cfg.layers}
    report = {
        "config": config_dict(cfg),
        "autoencoders": {**train_log, "onnx_parity_max_abs_diff": parity},
        "agreement": enc_test.agreement,
        "fidelity": fidelity,
        "causal_validity": validity,
        "network": {"nodes": len(compiled.cpts), "edges": int(sum(len(c.parents) for c in compiled.cpts.values())),
                    "outcome_parents": list(compiled.cpts[OUTCOME].parents), "fit_seconds": round(bn_seconds, 1),
                    "train_images": len(train)},
        "mostly_silent_concepts": dead,
        "held_out_images": len(test),
        "seconds": round(time.perf_counter() - t0, 1),
        "targets": {"agreement": 0.95, "fidelity": 0.90, "causal_validity_spearman": 0.5},
    }
    spec_out = ConceptSpec(cfg.states, tuple(layers), "causal_network.json", OUTCOME, report)
    spec_out.save(out / "concepts.json")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The validity report as a printed table."""
    t = report["targets"]
    lines = ["check                                   measured   target", "-" * 58]
    for l, a in report["agreement"].items():
        lines.append(f"agreement, autoencoder at {l:<12}  {a:8.4f}   >= {t['agreement']:.2f}")
    lines.append(f"BN fidelity argmax P(Y|concepts)         {report['fidelity']:8.4f}   >= {t['fidelity']:.2f}")
    cv = report["causal_validity"]
    lines.append(f"causal validity (Spearman, {cv['pairs']} pairs) {cv['spearman']:8.4f}   >= "
                 f"{t['causal_validity_spearman']:.2f}")
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
