"""Method 2 offline: ClaDec decoders and reference autoencoders (Schneider & Vlachos).

ClaDec: the frozen classifier up to layer ``l`` is the encoder; a decoder ``G_l`` learns
to reconstruct the input from ``a_l(x)`` with ``(1 - alpha) MSE + alpha CE(f(G_l(a_l)), y)``.
RefAE: the same architecture up to ``l``, freshly initialised, plus the same decoder,
trained end to end on MSE alone. What RefAE keeps but ClaDec loses is what the classifier
ignores at that layer.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from export.concepts import capture
from export.data.loader import ImageDataset
from export.train import TrainConfig, accuracy, one_cycle, train_classifier
from handlers.runtime.cladec import FORMAT as CLADEC_FORMAT
from handlers.runtime.imaging import InputSpec, normalize


@dataclass(frozen=True)
class ClaDecConfig:
    """Layers, alphas and training budget (defaults: a middle layer and the penultimate one)."""

    layers: tuple[str, ...] = ("layer2", "avgpool")
    alphas: tuple[float, ...] = (0.0, 0.001)
    epochs: int = 6
    batch_size: int = 128
    lr: float = 5e-3
    train_images: int = 5000
    eval_images: int = 1000
    fresh_classifier_epochs: int = 2
    seed: int = 0


class Decoder(nn.Module):
    """ClaDec decoder: (N, C, h, w) or (N, D) activations -> (N, channels, H, W) images in [0, 1].

    Vector input: Linear then reshape to (width, s, s), where s is the odd part of the
    output size (1 for 64 px, 7 for 224 px); spatial input: a 3x3 conv; then transposed
    convolutions (kernel 4, stride 2, padding 1) doubling the size until the input size,
    ReLU between, sigmoid output, no batch norm (the reference code's shape).
    """

    def __init__(self, act_shape: Sequence[int], out_channels: int, out_size: int, width: int | None = None) -> None:
        super().__init__()
        self.vector = len(act_shape) == 1 or tuple(act_shape[1:]) == (1, 1)
        c_in = int(act_shape[0])
        width = width or (128 if self.vector else max(32, c_in))
        start = out_size // (out_size & -out_size) if self.vector else int(act_shape[1])
        if self.vector and start > 16:
            raise ValueError(f"cannot grow a vector to {out_size} px: its odd part {start} is over 16")
        ups = int(round(math.log2(out_size / start)))
        if start * 2 ** ups != out_size:
            raise ValueError(f"cannot grow {start} px to {out_size} px by doubling")
        self.width, self.start = width, start
        self.entry: nn.Module = (nn.Linear(c_in, width * start * start) if self.vector
                                 else nn.Conv2d(c_in, width, 3, padding=1))
        layers: list[nn.Module] = [nn.ReLU()]
        c = width
        for i in range(ups):
            last = i == ups - 1
            c_next = out_channels if last else max(c // 2, 16)
            layers.append(nn.ConvTranspose2d(c, c_next, 4, 2, 1))
            layers.append(nn.Sigmoid() if last else nn.ReLU())
            c = c_next
        if ups == 0:
            layers += [nn.Conv2d(c, out_channels, 3, padding=1), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.vector:
            h = self.entry(a.reshape(a.shape[0], -1)).reshape(a.shape[0], self.width, self.start, self.start)
        else:
            h = self.entry(a)
        return self.body(h)


class RefAE(nn.Module):
    """Reference autoencoder: a fresh copy of the classifier up to ``layer`` plus a decoder.

    Input: normalised image (N, C, H, W); output: reconstruction in [0, 1].
    """

    def __init__(self, classifier: nn.Module, layer: str, decoder: Decoder) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(classifier)
        for m in self.encoder.modules():
            if hasattr(m, "reset_parameters") and m is not self.encoder:
                m.reset_parameters()
        self.layer = layer
        self.decoder = decoder
        self._acts: dict[str, torch.Tensor] = {}
        dict(self.encoder.named_modules())[layer].register_forward_hook(
            lambda _m, _i, o: self._acts.__setitem__("a", o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._acts.clear()
        self.encoder(x)
        return self.decoder(self._acts["a"])


def to_unit(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1] (the reconstruction target)."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).float() / 255.0


def renormalize(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """[0, 1] images (N, C, H, W) -> the classifier's normalised input."""
    mean = torch.tensor(spec.mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def cladec_loss(rec: torch.Tensor, target: torch.Tensor, alpha: float, classifier: nn.Module | None = None,
                spec: InputSpec | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``(1 - alpha) MSE(rec, target) + alpha CE(f(rec), y)``; plain MSE when alpha is 0.

    rec, target: (N, C, H, W) in [0, 1]; labels: (N,) class indices.
    """
    mse = F.mse_loss(rec, target)
    if alpha <= 0 or classifier is None:
        return mse
    ce = F.cross_entropy(classifier(renormalize(rec, spec)), labels)
    return (1 - alpha) * mse + alpha * ce


def _subset(ds: ImageDataset, n: int, seed: int) -> ImageDataset:
    return ds.take(np.random.default_rng(seed).permutation(len(ds))[:n])


@torch.no_grad()
def _activations(model: nn.Module, layer: str, ds: ImageDataset, spec: InputSpec, bs: int = 256) -> torch.Tensor:
    out = []
    for s in range(0, len(ds), bs):
        _, acts = capture(model, [layer], torch.from_numpy(normalize(ds.pixels[s:s + bs], spec)))
        out.append(acts[layer])
    return torch.cat(out)


def _train(module: nn.Module, params: list[nn.Parameter], inputs: torch.Tensor | None, ds: ImageDataset,
           spec: InputSpec, cfg: ClaDecConfig, alpha: float, classifier: nn.Module | None, desc: str,
           progress: bool) -> float:
    """Minimise (1-alpha) MSE + alpha CE over ``ds``; ``inputs`` are cached activations
    (ClaDec) or None (RefAE: the module takes normalised images)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    steps = cfg.epochs * -(-len(ds) // cfg.batch_size)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = one_cycle(opt, cfg.lr, steps, 0.2)
    module.train()
    t0 = time.perf_counter()
    with tqdm(total=steps, desc=desc, disable=not progress, unit="step") as bar:
        for _ in range(cfg.epochs):
            order = rng.permutation(len(ds))
            for s in range(0, len(ds), cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                target = to_unit(ds.pixels[idx])
                x = inputs[idx] if inputs is not None else torch.from_numpy(normalize(ds.pixels[idx], spec))
                rec = module(x)
                loss = cladec_loss(rec, target, alpha, classifier, spec, torch.from_numpy(ds.labels[idx]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    module.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def reconstruct(module: nn.Module, inputs: torch.Tensor, bs: int = 256) -> torch.Tensor:
    return torch.cat([module(inputs[s:s + bs]) for s in range(0, len(inputs), bs)])


def _fresh_accuracy(model_factory, recon_train: torch.Tensor, train: ImageDataset, recon_test: torch.Tensor,
                    test: ImageDataset, spec: InputSpec, epochs: int, seed: int) -> float | None:
    """Accuracy on test reconstructions of a fresh classifier trained on train reconstructions
    (None with ``epochs`` 0: the check is skipped)."""
    if epochs <= 0:
        return None
    def as_ds(rec: torch.Tensor, ds: ImageDataset) -> ImageDataset:
        pix = (rec.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return ImageDataset(pix, ds.labels, ds.classes, ds.paths)
    model = model_factory()
    res = train_classifier(model, as_ds(recon_train, train), as_ds(recon_test, test), spec,
                           TrainConfig(epochs=epochs, seed=seed), progress=False)
    return res.test_accuracy


def build_cladec(model: nn.Module, model_factory, spec: InputSpec, train: ImageDataset, test: ImageDataset,
                 out: Path, cfg: ClaDecConfig, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate and export every decoder. Writes ONNX files and ``cladec.json`` into ``out``."""
    from export.onnx_export import export_module, module_parity
    import json
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tr = _subset(train, cfg.train_images, cfg.seed)
    te = _subset(test, cfg.eval_images, cfg.seed + 1)
    x_te_unit = to_unit(te.pixels)
    x_te_norm = torch.from_numpy(normalize(te.pixels, spec))
    entries, evaluation, parity = [], [], {}
    t_all = time.perf_counter()
    for layer in cfg.layers:
        acts_tr = _activations(model, layer, tr, spec)
        acts_te = _activations(model, layer, te, spec)
        act_shape = tuple(acts_tr.shape[1:])
        safe = layer.replace(".", "_")
        # reference autoencoder (one per layer, MSE only)
        ref = RefAE(model, layer, Decoder(act_shape, spec.channels, spec.height))
        ref_seconds = _train(ref, list(ref.parameters()), None, tr, spec, cfg, 0.0, None, f"RefAE {layer}", progress)
        for p in ref.parameters():
            p.requires_grad_(False)
        ref_te = reconstruct(ref, x_te_norm)
        ref_tr = reconstruct(ref, torch.from_numpy(normalize(tr.pixels, spec)))
        ref_file = f"refae_{safe}.onnx"
        export_module(ref, torch.zeros(2, spec.channels, spec.height, spec.width), out / ref_file, "image", "reconstruction")
        parity[ref_file] = module_parity(ref, out / ref_file, (spec.channels, spec.height, spec.width))
        ref_mse = float(F.mse_loss(ref_te, x_te_unit))
        ref_acc = float((model(renormalize(ref_te, spec)).argmax(1).numpy() == te.labels).mean())
        ref_fresh = _fresh_accuracy(model_factory, ref_tr, tr, ref_te, te, spec, cfg.fresh_classifier_epochs, cfg.seed)
        for alpha in cfg.alphas:
            dec = Decoder(act_shape, spec.channels, spec.height)
            seconds = _train(dec, list(dec.parameters()), acts_tr, tr, spec, cfg, alpha, model,
                             f"ClaDec {layer} a={alpha:g}", progress)
            cla_te = reconstruct(dec, acts_te)
            cla_tr = reconstruct(dec, acts_tr)
            dec_file = f"cladec_{safe}_a{alpha:g}".replace(".", "p") + ".onnx"
            export_module(dec, torch.zeros(2, *act_shape), out / dec_file, "activation", "reconstruction")
            parity[dec_file] = module_parity(dec, out / dec_file, act_shape, nonneg=True)
            evaluation.append({
                "layer": layer, "alpha": alpha,
                "mse_cladec": float(F.mse_loss(cla_te, x_te_unit)), "mse_refae": ref_mse,
                "classifier_accuracy_on_cladec": float((model(renormalize(cla_te, spec)).argmax(1).numpy() == te.labels).mean()),
                "classifier_accuracy_on_refae": ref_acc,
                "fresh_classifier_accuracy_on_cladec": _fresh_accuracy(model_factory, cla_tr, tr, cla_te, te, spec,
                                                                       cfg.fresh_classifier_epochs, cfg.seed),
                "fresh_classifier_accuracy_on_refae": ref_fresh,
                "train_seconds_cladec": round(seconds, 1), "train_seconds_refae": round(ref_seconds, 1),
            })
            entries.append({"layer": layer, "alpha": alpha, "decoder_file": dec_file, "refae_file": ref_file})
    bad = {k: v for k, v in parity.items() if v > 1e-4}
    if bad:
        raise RuntimeError(f"ClaDec ONNX files differ from torch: {bad}")
    report = {"config": {**asdict(cfg), "layers": list(cfg.layers), "alphas": list(cfg.alphas)},
              "evaluation": evaluation, "onnx_parity_max_abs_diff": parity,
              "train_images": len(tr), "eval_images": len(te), "seconds": round(time.perf_counter() - t_all, 1)}
    (out / "cladec.json").write_text(json.dumps({"format": CLADEC_FORMAT, "decoders": entries, "report": report},
                                                indent=1) + "\n")
    return report


def _acc(v: float | None) -> str:
    return "skipped" if v is None else f"{v:.4f}"


def format_report(report: dict[str, Any]) -> str:
    lines = ["layer     alpha   MSE ClaDec  MSE RefAE  acc(f) ClaDec  acc(f) RefAE  fresh ClaDec  fresh RefAE",
             "-" * 94]
    for e in report["evaluation"]:
        lines.append(f"{e['layer']:<9} {e['alpha']:<7g} {e['mse_cladec']:10.4f} {e['mse_refae']:10.4f} "
                     f"{e['classifier_accuracy_on_cladec']:14.4f} {e['classifier_accuracy_on_refae']:13.4f} "
                     f"{_acc(e['fresh_classifier_accuracy_on_cladec']):>13} {_acc(e['fresh_classifier_accuracy_on_refae']):>12}")
    return "\n".join(lines)
