"""Method 2 offline: ClaDec decoders and reference autoencoders (Schneider & Vlachos).

ClaDec: the frozen classifier up to layer ``l`` is the encoder; a decoder ``G_l`` learns
to reconstruct the input from ``a_l(x)`` with ``(1 - alpha) MSE + alpha CE(f(G_l(a_l)), y)``.
RefAE: the same architecture up to ``l``, freshly initialised, plus the same decoder,
trained end to end on MSE alone. What RefAE keeps but ClaDec loses is what the classifier
ignores at that layer.

Training choices (each one fixes a way the decoders failed to learn):

- The decoder standardises its input with fixed per-channel statistics measured on the
  training activations (constant buffers, so the ONNX decoder still takes the raw
  activations). A trained classifier's activations are unscaled (post-ReLU, means ~0.5,
  maxima ~7, many dead channels); fed raw, Adam's first steps pushed the decoder's ReLUs
  dead and its sigmoid into saturation, and it stayed at a constant (black or mean) image.
- The sigmoid output starts at the training images' mean pixel (the last bias is its
  logit), so training starts from the constant-image baseline, not from saturation.
- A vector (e.g. ``avgpool``) is mapped by the linear layer to an 8x8 grid (not 1x1), so
  the transposed convolutions start from a spatial layout rather than a single pixel.
- The default budget is 6 epochs but at least ``min_steps`` (200) steps: on small data
  sets (the 1,347 training digits are 11 batches) 6 epochs were too few for the RefAE at
  ``avgpool`` at 64 px (MSE 0.041 after 66 steps, 0.010 after 200). An explicit ``epochs``
  is taken as given (the test fixtures and the benchmark build train a few steps).
  Adam's peak rate stays 5e-3 (2e-3 did worse at every layer on the digits).
- Every ClaDec decoder of a layer trains the same number of steps as the layer's RefAE:
  the first half on MSE alone (one run, shared by the layer's alphas), the second half on
  its own loss. Trained from scratch, the CE term (of the constant starting image)
  dominated and the decoders with alpha > 0 ended worse than the alpha-0 decoder at their
  own loss (digits, ``layer2``, alpha 0.1, 200 steps: ``0.9 MSE + 0.1 CE`` = 0.055 against
  the alpha-0 decoder's 0.010; MSE 0.045 and a lower classifier accuracy).
- The reconstruction error weighs the object's pixels ``1 + object_weight`` (10) times the
  background's (:func:`object_weights`: pixels that differ from the image's border colour).
  On the demo a small shape sits on a plain background, and plain MSE spent the budget on the
  background: the classifier recognised 8.8 % of 500 held-out layer2 ClaDec reconstructions
  after the demo's 240 steps (chance 10 %), 19.0 % with the weighting at the same cost
  (1,000 steps: 28.0 % plain, 36.8 % weighted). The RefAE is trained with the same loss, so
  the triplet still compares encoders only. Vector layers are weighted too: at ``avgpool`` the
  demo's plain-MSE RefAE (128 wide, 960 steps of 64) drew the background alone (MSE 0.0096),
  the weighted one a blob of the shape's colour and size at its position (0.0061). On the real
  digits, where strokes fill much of the image, the weighting cost the ``avgpool`` ClaDec
  decoder some accuracy in a 120-step run (0.86 against 0.94 recognised; chance 0.10).
  Single runs of one classifier each; ``object_weight`` 0 is the plain MSE everywhere.
- Decoders are 128 channels wide at their first feature map and train on batches of 64:
  on the demo's layer2, 960 steps of 64 images were recognised as often as 960 of 128 (ClaDec
  0.758 / 0.750, RefAE 0.876 / 0.870) at half the time, and width 128 against the old 32
  lifted ClaDec from 0.42 to 0.69 at 480 steps.
- The RefAE's encoder is a copy of the classifier re-initialised *and trainable* (the copy
  of a frozen classifier kept ``requires_grad=False``, so only its decoder trained).

The report (``build_cladec``) gives, per layer, the RefAE and, per alpha of the sweep, the
reconstruction MSE, the classifier's accuracy on the reconstructions and a fresh
classifier's accuracy (same architecture, trained on train-set reconstructions with early
stopping on a held-out part of them, evaluated on test-set reconstructions), beside two
baselines: the MSE of the constant (training-mean) image and the fresh classifier trained
the same way on the real images (the ceiling).
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from export.concepts import capture
from export.data.loader import ImageDataset
from export.device import autocast, device_of, is_mixed, to_numpy
from export.train import TrainConfig, accuracy, batches, one_cycle
from handlers.runtime.cladec import FORMAT as CLADEC_FORMAT
from handlers.runtime.imaging import InputSpec, normalize

ModelFactory = Callable[[], nn.Module]
DEFAULT_EPOCHS = 6


@dataclass(frozen=True)
class ClaDecConfig:
    """Layers, alphas and training budgets (defaults: a middle layer and the penultimate one).

    ``alphas`` are the served decoders (exported to ONNX); ``sweep_alphas`` are trained and
    evaluated for the report only (the comprehensibility-fidelity trade-off; not exported).
    Every decoder and RefAE trains ``epochs`` passes over ``train_images`` images (None:
    ``DEFAULT_EPOCHS`` passes but at least ``min_steps`` steps); a layer's decoders share
    the first half (MSE alone) and train the second half on their own loss.

    The fresh-classifier check trains a new classifier (the model factory's architecture)
    on ``fresh_classifier_images`` of the training reconstructions, of which
    ``fresh_validation_fraction`` are held out for early stopping: at most
    ``fresh_classifier_epochs`` epochs (0 skips the check), stopping once the held-out
    accuracy has not improved for ``fresh_classifier_patience`` epochs, testing the best
    epoch's weights on the reconstructions of the ``eval_images`` test images. The same
    budget on the real images is the ceiling. (On the demo shapes, a fresh classifier needs
    far more than this budget to learn the real images, so there the ceiling is low and
    reconstructions that simplify the image can beat it.)
    """

    layers: tuple[str, ...] = ("layer2", "avgpool")
    alphas: tuple[float, ...] = (0.0, 0.001)
    sweep_alphas: tuple[float, ...] = (0.0, 0.001, 0.01, 0.1)
    epochs: int | None = None
    min_steps: int = 200
    batch_size: int = 64
    lr: float = 5e-3
    train_images: int = 5000
    eval_images: int = 1000
    fresh_classifier_epochs: int = 12
    fresh_classifier_patience: int = 3
    fresh_classifier_images: int = 2500
    fresh_classifier_batch_size: int = 64
    fresh_validation_fraction: float = 0.2
    object_weight: float = 10.0
    # channels of every decoder's first feature map (a spatial layer's at least its own C; see
    # Decoder). On the demo's layer2 (32 channels, 16 x 16), 480 steps of the alpha-0 decoder:
    # the classifier recognised 42 % of 500 held-out reconstructions at the old 32, 55 % at
    # 64, 69 % at 128; served, the 128-wide decoder takes 0.66 ms per image (0.13 ms at 32).
    decoder_width: int = 128
    # "bf16": decoders and RefAEs train under bfloat16 autocast (the loss in float32, weights
    # and optimiser in float32), as export.train.TrainConfig.precision; "auto": bf16 where the
    # device has bfloat16 units (export.device.fast_bf16), else fp32. On the demo's layer2 (480
    # steps of 128, width 128) bf16 and fp32 decoders were recognised alike (0.676 and 0.688)
    # in 50 and 97 s on this project's AMX CPU.
    precision: str = "auto"
    seed: int = 0


def _grid_start(out_size: int, most: int = 8) -> int:
    """Side of the grid a vector is reshaped to: the largest ``s <= most`` with
    ``out_size = s * 2**k`` (or the odd part of ``out_size`` when that is over ``most``)."""
    odd = out_size // (out_size & -out_size)
    if odd > most:
        return odd
    s = odd
    while s * 2 <= most and out_size % (s * 2) == 0:
        s *= 2
    return s


class Decoder(nn.Module):
    """ClaDec decoder: (N, C, h, w) or (N, D) activations -> (N, channels, H, W) images in [0, 1].

    ``width``: channels of the first feature map (a spatial layer's decoder keeps at least the
    layer's C); the channels halve (down to 16) at each doubling. Default 64 for a vector and
    32 for a spatial layer; :class:`ClaDecConfig` passes its ``decoder_width``.

    The input is first standardised per channel with the constant buffers ``act_mean`` and
    ``act_std`` (shape (C,); identity until :meth:`fit_input_statistics`). Vector input:
    Linear then reshape to (width, s, s), s the largest size <= 8 that doubles to the output
    size (8 for 32, 64 or 256 px, 7 for 28 and 224 px, 6 for 96 px); spatial input: a 3x3 conv;
    then transposed convolutions (kernel 4, stride 2, padding 1) doubling the size until
    the input size, ReLU between, sigmoid output, no batch norm (the reference code's shape).
    """

    act_mean: torch.Tensor
    act_std: torch.Tensor

    def __init__(self, act_shape: Sequence[int], out_channels: int, out_size: int, width: int | None = None) -> None:
        super().__init__()
        self.vector = len(act_shape) == 1 or tuple(act_shape[1:]) == (1, 1)
        c_in = int(act_shape[0])
        width = width or (64 if self.vector else 32)
        width = width if self.vector else max(width, c_in)
        start = _grid_start(out_size) if self.vector else int(act_shape[1])
        if self.vector and start > 16:
            raise ValueError(f"cannot grow a vector to {out_size} px: its odd part {start} is over 16")
        ups = int(round(math.log2(out_size / start))) if out_size >= start else -1
        if ups < 0 or start * 2 ** ups != out_size:
            raise ValueError(f"cannot grow {start} px to {out_size} px by doubling")
        self.width, self.start = width, start
        self.register_buffer("act_mean", torch.zeros(c_in))
        self.register_buffer("act_std", torch.ones(c_in))
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

    @property
    def output_layer(self) -> nn.Module:
        """The convolution before the sigmoid."""
        return self.body[-2]

    @torch.no_grad()
    def fit_input_statistics(self, acts: torch.Tensor) -> None:
        """Set ``act_mean``/``act_std`` from training activations (N, C, h, w) or (N, D).

        Per channel over samples and positions; a channel's std is floored at 1e-3 of the
        largest channel std (dead channels stay near zero instead of being blown up)."""
        a = acts.reshape(acts.shape[0], -1) if self.vector else acts.transpose(0, 1).reshape(acts.shape[1], -1).T
        mean = a.mean(0)
        std = a.std(0)
        std = std.clamp_min(1e-3 * float(std.max()) + 1e-8)
        self.act_mean.copy_(mean.float())
        self.act_std.copy_(std.float())

    @torch.no_grad()
    def set_output_prior(self, mean_pixel: Sequence[float]) -> None:
        """Start the output at ``mean_pixel`` (one value in (0, 1) per channel): the last
        layer's bias becomes its logit, so training starts at the constant-image baseline."""
        p = torch.tensor([min(max(float(v), 1e-3), 1 - 1e-3) for v in mean_pixel])
        bias = self.output_layer.bias
        assert isinstance(bias, torch.Tensor)  # a Conv2d / ConvTranspose2d built with a bias
        bias.copy_(torch.log(p / (1 - p)))

    def standardise(self, a: torch.Tensor) -> torch.Tensor:
        """Raw activations -> the standardised entry input ((N, D) for vectors)."""
        if self.vector:
            return (a.reshape(a.shape[0], -1) - self.act_mean) / self.act_std
        return (a - self.act_mean.view(1, -1, 1, 1)) / self.act_std.view(1, -1, 1, 1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        z = self.standardise(a)
        if self.vector:
            h = self.entry(z).reshape(a.shape[0], self.width, self.start, self.start)
        else:
            h = self.entry(z)
        return self.body(h)


class _Reached(Exception):
    """Raised by the RefAE's hook in training mode: the layers after ``layer`` are not run."""


class RefAE(nn.Module):
    """Reference autoencoder: a fresh copy of the classifier up to ``layer`` plus a decoder.

    Every module of the copy that has ``reset_parameters`` (convolutions, linear layers,
    batch norms, whose running statistics are reset too) is re-initialised, and all its
    parameters are trainable again (the classifier it is copied from is frozen). Only the
    modules up to ``layer`` get gradients: the loss depends on the layer's output alone. In
    training mode the forward pass stops at ``layer``; in eval mode (and in the ONNX export)
    the copy runs whole and its layers after ``layer`` are unused.

    Input: normalised image (N, C, H, W); output: reconstruction (N, C, H, W) in [0, 1].
    """

    def __init__(self, classifier: nn.Module, layer: str, decoder: Decoder) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(classifier)
        for m in self.encoder.modules():
            if hasattr(m, "reset_parameters") and m is not self.encoder:
                cast(Any, m).reset_parameters()
        for p in self.encoder.parameters():
            p.requires_grad_(True)
        self.layer = layer
        self.decoder = decoder
        self._acts: dict[str, torch.Tensor] = {}
        dict(self.encoder.named_modules())[layer].register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self._acts["a"] = output
        if self.training:
            raise _Reached

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The fresh encoder's activations at ``layer`` for normalised images x."""
        self._acts.clear()
        try:
            self.encoder(x)
        except _Reached:
            pass
        return self._acts["a"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))


def to_unit(pixels: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1] (the reconstruction target), on
    ``device`` (default: the CPU)."""
    unit = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).float() / 255.0
    return unit if device is None else unit.to(device)


def to_uint8_pixels(images: torch.Tensor) -> np.ndarray:
    """[0, 1] float (N, C, H, W) -> uint8 (N, H, W, C), as the served PNGs quantise them."""
    return to_numpy((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1))


def renormalize(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """[0, 1] images (N, C, H, W) -> the classifier's normalised input."""
    mean = torch.tensor(spec.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


#: A target pixel is "object" when its channels differ from the image's background (the
#: per-channel median of its border pixels) by more than this in sum ([0, 1] units).
OBJECT_THRESHOLD = 0.15


def object_weights(target: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per-pixel weights (N, 1, H, W): ``1 + object_weight`` on the target's object pixels (see
    :data:`OBJECT_THRESHOLD`), 1 on its background. target: (N, C, H, W) in [0, 1]."""
    border = torch.cat([target[:, :, 0, :], target[:, :, -1, :], target[:, :, :, 0], target[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    is_object = (target - background).abs().sum(dim=1, keepdim=True) > OBJECT_THRESHOLD
    return 1.0 + object_weight * is_object.to(target.dtype)


def cladec_loss(rec: torch.Tensor, target: torch.Tensor, alpha: float, classifier: nn.Module | None = None,
                spec: InputSpec | None = None, labels: torch.Tensor | None = None,
                object_weight: float = 0.0) -> torch.Tensor:
    """``(1 - alpha) MSE(rec, target) + alpha CE(f(rec), y)``; plain MSE when alpha is 0.

    With ``object_weight`` > 0 the MSE is weighted per pixel by :func:`object_weights` and
    divided by the mean weight (an image without an object keeps the plain MSE).
    rec, target: (N, C, H, W) in [0, 1]; labels: (N,) class indices.
    """
    if object_weight > 0:
        w = object_weights(target, object_weight)
        mse = (w * (rec - target) ** 2).mean() / w.mean()
    else:
        mse = F.mse_loss(rec, target)
    if alpha <= 0 or classifier is None:
        return mse
    assert spec is not None and labels is not None, "the classification term needs spec and labels"
    ce = F.cross_entropy(classifier(renormalize(rec, spec)), labels)
    return (1 - alpha) * mse + alpha * ce


def _subset(ds: ImageDataset, n: int, seed: int) -> ImageDataset:
    return ds.take(np.random.default_rng(seed).permutation(len(ds))[:n])


@torch.no_grad()
def _activations(model: nn.Module, layer: str, ds: ImageDataset, spec: InputSpec, bs: int = 256) -> torch.Tensor:
    """The frozen classifier's activations at ``layer`` for every image of ``ds``: (N, ...), on
    the classifier's device."""
    out = []
    device = device_of(model)
    for s in range(0, len(ds), bs):
        _, acts = capture(model, [layer], torch.from_numpy(normalize(ds.pixels[s:s + bs], spec)).to(device))
        out.append(acts[layer])
    return torch.cat(out)


def mean_pixel(ds: ImageDataset) -> list[float]:
    """Mean of each channel over the images of ``ds``, in [0, 1]."""
    return [float(v) for v in ds.pixels.reshape(-1, ds.pixels.shape[-1]).mean(0) / 255.0]


def train_steps(n: int, cfg: ClaDecConfig) -> int:
    """Optimiser steps of a served decoder or a RefAE on ``n`` training images:
    ``cfg.epochs`` passes, or with ``epochs`` None ``DEFAULT_EPOCHS`` passes but at least
    ``cfg.min_steps``."""
    per_epoch = -(-n // cfg.batch_size)
    if cfg.epochs is not None:
        return cfg.epochs * per_epoch
    return max(DEFAULT_EPOCHS * per_epoch, cfg.min_steps)


@dataclass
class FitLog:
    """What one decoder or RefAE training did."""

    steps: int
    seconds: float
    final_loss: float  # mean of the last 10 steps' losses
    encoder_change: float | None = None  # RefAE: ||encoder weights - initial|| / ||initial||


def _fit(module: nn.Module, inputs: torch.Tensor | None, ds: ImageDataset, spec: InputSpec, cfg: ClaDecConfig,
         alpha: float, classifier: nn.Module | None, desc: str, progress: bool, steps: int | None = None) -> FitLog:
    """Minimise ``(1 - alpha) MSE + alpha CE`` over ``ds`` with Adam and a one-cycle rate,
    over every trainable parameter of ``module``. ``inputs`` are cached activations (N, ...)
    for ClaDec, or None for the RefAE (the module then takes normalised images); ``steps``
    defaults to :func:`train_steps`. Trains on the module's device."""
    if len(ds) == 0:
        raise ValueError("no training images")
    torch.manual_seed(cfg.seed)
    device = device_of(module)
    mixed = is_mixed(cfg.precision, device)
    rng = np.random.default_rng(cfg.seed)
    steps = train_steps(len(ds), cfg) if steps is None else steps
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = one_cycle(opt, cfg.lr, steps, 0.2)
    module.train()
    t0 = time.perf_counter()
    step = 0
    recent: list[float] = []
    with tqdm(total=steps, desc=desc, disable=not progress, unit="step") as bar:
        while step < steps:
            order = rng.permutation(len(ds))
            for s in range(0, len(ds), cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                if len(idx) < 2 and len(ds) > 1:  # batch norm (RefAE) cannot train on one image
                    continue
                target = to_unit(ds.pixels[idx], device)
                x = inputs[idx] if inputs is not None else torch.from_numpy(normalize(ds.pixels[idx], spec)).to(device)
                with autocast(device, mixed):
                    loss = cladec_loss(module(x).float(), target, alpha, classifier, spec,
                                       torch.from_numpy(ds.labels[idx]).to(device), cfg.object_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                recent = (recent + [float(loss.detach())])[-10:]
                bar.update(1)
                bar.set_postfix(loss=f"{recent[-1]:.4f}")
                if step >= steps:
                    break
    module.eval()
    return FitLog(steps, round(time.perf_counter() - t0, 1), float(np.mean(recent)))


def train_decoder(acts: torch.Tensor, ds: ImageDataset, spec: InputSpec, cfg: ClaDecConfig, alpha: float,
                  classifier: nn.Module, progress: bool = False, desc: str = "ClaDec",
                  steps: int | None = None, init: Decoder | None = None) -> tuple[Decoder, FitLog]:
    """A ClaDec decoder for the frozen ``classifier``'s activations ``acts`` (N, ...) of the
    images of ``ds`` (same order), trained ``steps`` steps (default :func:`train_steps`),
    starting from a copy of ``init`` (a decoder of the same activations) when given.
    Returns the decoder (eval mode) and its training log."""
    torch.manual_seed(cfg.seed)
    dec = Decoder(tuple(acts.shape[1:]), spec.channels, spec.height, cfg.decoder_width).to(acts.device)
    if init is not None:
        dec.load_state_dict(init.state_dict())
    else:
        dec.fit_input_statistics(acts)
        dec.set_output_prior(mean_pixel(ds))
    log = _fit(dec, acts, ds, spec, cfg, alpha, classifier, desc, progress, steps)
    return dec, log


def new_refae(classifier: nn.Module, layer: str, act_shape: Sequence[int], ds: ImageDataset, spec: InputSpec,
              seed: int = 0, width: int = ClaDecConfig.decoder_width) -> RefAE:
    """An untrained reference autoencoder for ``layer`` (activations of shape ``act_shape``
    per image), its decoder ``width`` wide (:class:`Decoder`; by default as wide as a ClaDec
    decoder of the default config, so the triplet compares encoders). Its decoder's output
    starts at the mean pixel of ``ds``; its input
    standardisation stays the identity: the fresh encoder learns its scale with the decoder,
    and its batch norms in training mode give unit-scale activations. (Statistics measured
    on the untrained encoder in eval mode did not match the batch statistics it sees in
    training, and the RefAE collapsed to a black image.)"""
    torch.manual_seed(seed)
    ref = RefAE(classifier, layer, Decoder(act_shape, spec.channels, spec.height, width)).to(device_of(classifier))
    ref.decoder.set_output_prior(mean_pixel(ds))
    return ref


def train_refae(ref: RefAE, ds: ImageDataset, spec: InputSpec, cfg: ClaDecConfig, progress: bool = False) -> FitLog:
    """Train ``ref`` end to end (encoder and decoder) on MSE over ``ds``, in place; then
    freeze it (eval mode, no gradients). The log's ``encoder_change`` is the encoder weights'
    relative L2 change."""
    before = [p.detach().clone() for p in ref.encoder.parameters()]
    log = _fit(ref, None, ds, spec, cfg, 0.0, None, f"RefAE {ref.layer}", progress)
    after = [p.detach() for p in ref.encoder.parameters()]
    change_sq = cast(torch.Tensor, sum(((a - b) ** 2).sum() for a, b in zip(after, before)))
    norm_sq = cast(torch.Tensor, sum((b ** 2).sum() for b in before))
    log.encoder_change = float(torch.sqrt(change_sq) / torch.sqrt(norm_sq))
    for p in ref.parameters():
        p.requires_grad_(False)
    return log


@torch.no_grad()
def reconstruct(module: nn.Module, inputs: torch.Tensor, bs: int = 256) -> torch.Tensor:
    """Batched ``module(inputs)`` in eval mode: (N, ...) -> (N, C, H, W)."""
    module.eval()
    return torch.cat([module(inputs[s:s + bs]) for s in range(0, len(inputs), bs)])


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: torch.Tensor, labels: np.ndarray, spec: InputSpec) -> float:
    """Accuracy of ``model`` on [0, 1] images (N, C, H, W) quantised to uint8 as served."""
    return accuracy(model, ImageDataset(to_uint8_pixels(images), labels, (), [""] * len(labels)), spec)


@dataclass
class FreshResult:
    """A fresh classifier trained on one kind of image: accuracy on the test images at its
    best epoch (by validation accuracy), the epochs run and why it stopped."""

    accuracy: float
    validation_accuracy: float
    best_epoch: int
    epochs_run: int
    stopped: str  # "plateau" (early stopping) or "max_epochs"
    seconds: float


def fresh_classifier(model_factory: ModelFactory, train_pixels: np.ndarray, train_labels: np.ndarray,
                     test_pixels: np.ndarray, test_labels: np.ndarray, spec: InputSpec, cfg: ClaDecConfig,
                     classes: tuple[str, ...] = ()) -> FreshResult | None:
    """Train ``model_factory()`` on uint8 images (N, H, W, C) and test it on others.

    Uses ``cfg.fresh_classifier_images`` of the training images (the same seeded subset for
    every kind of image with the same count), ``cfg.fresh_validation_fraction`` of them
    held out for early stopping: at most ``cfg.fresh_classifier_epochs`` epochs (batches of
    ``cfg.fresh_classifier_batch_size``, AdamW with the classifier's learning rate and weight
    decay, one warm-up epoch then cosine decay), stopping after
    ``cfg.fresh_classifier_patience`` epochs without a better validation accuracy; the
    weights of the best epoch are tested. None when ``fresh_classifier_epochs`` is 0."""
    if cfg.fresh_classifier_epochs <= 0:
        return None
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(train_labels))[:cfg.fresh_classifier_images]
    n_val = max(1, int(round(cfg.fresh_validation_fraction * len(order)))) if len(order) > 1 else 0
    val_idx, fit_idx = order[:n_val], order[n_val:]

    def ds(pix: np.ndarray, lab: np.ndarray) -> ImageDataset:
        return ImageDataset(pix, lab, classes, [""] * len(lab))

    fit, val = ds(train_pixels[fit_idx], train_labels[fit_idx]), ds(train_pixels[val_idx], train_labels[val_idx])
    test = ds(test_pixels, test_labels)
    tc = TrainConfig()
    model = model_factory()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    per_epoch = -(-len(fit) // cfg.fresh_classifier_batch_size)
    total = per_epoch * cfg.fresh_classifier_epochs
    warm = min(per_epoch, max(total // 4, 1))

    def rate(step: int) -> float:  # linear warm-up, then cosine decay to 0 at the last possible step
        return (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    best_acc, best_epoch, best_state, stopped, epoch = -1.0, 0, None, "max_epochs", 0
    for epoch in range(1, cfg.fresh_classifier_epochs + 1):
        model.train()
        for x, y in batches(fit, spec, cfg.fresh_classifier_batch_size, rng.permutation(len(fit)), device_of(model)):
            if len(y) < 2:  # batch norm cannot train on one image
                continue
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val_acc = accuracy(model, val, spec) if len(val) else 0.0
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= cfg.fresh_classifier_patience:
            stopped = "plateau"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    acc = accuracy(model, test, spec)
    return FreshResult(acc, best_acc, best_epoch, epoch, stopped, round(time.perf_counter() - t0, 1))


def _fresh_dict(r: FreshResult | None) -> dict[str, Any] | None:
    return None if r is None else asdict(r)


def _fresh_acc(r: FreshResult | None) -> float | None:
    return None if r is None else r.accuracy


def _alpha_file(safe: str, alpha: float) -> str:
    return f"cladec_{safe}_a{alpha:g}".replace(".", "p") + ".onnx"


#: Largest accepted onnxruntime-vs-torch difference of a ClaDec decoder or RefAE output.
CLADEC_PARITY = 5e-4


@dataclass
class _ClaDecBuild:
    """One ClaDec build's shared state: the frozen classifier, the train and evaluation
    subsets (uint8 pixels, [0, 1] and normalised tensors), the config and the ONNX parity of
    every file written into ``out``."""

    model: nn.Module
    model_factory: ModelFactory
    spec: InputSpec
    tr: ImageDataset
    te: ImageDataset
    out: Path
    cfg: ClaDecConfig
    progress: bool
    parity: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = device_of(self.model)
        self.x_te_unit = to_unit(self.te.pixels, self.device)
        self.x_te_norm = torch.from_numpy(normalize(self.te.pixels, self.spec)).to(self.device)
        self.x_tr_norm = torch.from_numpy(normalize(self.tr.pixels, self.spec)).to(self.device)

    def fresh(self, module: nn.Module | None = None, inputs_tr: torch.Tensor | None = None,
              rec_te: torch.Tensor | None = None) -> FreshResult | None:
        """The fresh classifier on the reconstructions of ``module`` (train: from ``inputs_tr``;
        test: ``rec_te``), or with ``module`` None on the real images (the ceiling)."""
        cfg, tr, te, spec = self.cfg, self.tr, self.te, self.spec
        if cfg.fresh_classifier_epochs <= 0:
            return None
        if module is None:
            return fresh_classifier(self.model_factory, tr.pixels, tr.labels, te.pixels, te.labels, spec, cfg,
                                    tr.classes)
        assert inputs_tr is not None and rec_te is not None  # every call with a module passes both
        return fresh_classifier(self.model_factory, to_uint8_pixels(reconstruct(module, inputs_tr)), tr.labels,
                                to_uint8_pixels(rec_te), te.labels, spec, cfg, tr.classes)

    def scores(self, reconstructions: torch.Tensor, fr: FreshResult | None) -> dict[str, Any]:
        """MSE against the evaluation images, the classifier's and the fresh classifier's accuracy."""
        return {"mse": float(F.mse_loss(reconstructions, self.x_te_unit)),
                "classifier_accuracy": classifier_accuracy(self.model, reconstructions, self.te.labels, self.spec),
                "fresh_classifier_accuracy": _fresh_acc(fr), "fresh_classifier": _fresh_dict(fr)}

    def baselines(self) -> dict[str, Any]:
        """The constant (training-mean) image, the classifier and the fresh classifier on real images."""
        constant = to_unit(self.tr.pixels, self.device).mean(0, keepdim=True)
        return {"mse_constant_image": float(F.mse_loss(constant.expand_as(self.x_te_unit), self.x_te_unit)),
                "classifier_accuracy_on_real": classifier_accuracy(self.model, self.x_te_unit, self.te.labels,
                                                                   self.spec),
                "fresh_classifier_on_real": _fresh_dict(self.fresh())}

    def export(self, module: nn.Module, example: torch.Tensor, file: str, input_name: str, nonneg: bool = False
               ) -> None:
        from export.onnx_export import export_module, module_parity
        export_module(module, example, self.out / file, input_name, "reconstruction")
        self.parity[file] = module_parity(module, self.out / file, tuple(example.shape[1:]), nonneg=nonneg)

    def refae(self, layer: str, act_shape: tuple[int, ...]) -> tuple[dict[str, Any], str]:
        """The layer's reference autoencoder (MSE only, encoder trained from scratch), exported;
        its report row and file."""
        spec = self.spec
        ref = new_refae(self.model, layer, act_shape, self.tr, spec, self.cfg.seed, self.cfg.decoder_width)
        ref_log = train_refae(ref, self.tr, spec, self.cfg, self.progress)
        ref_te = reconstruct(ref, self.x_te_norm)
        ref_file = f"refae_{layer.replace('.', '_')}.onnx"
        self.export(ref, torch.zeros(2, spec.channels, spec.height, spec.width), ref_file, "image")
        row = {"layer": layer, **self.scores(ref_te, self.fresh(ref, self.x_tr_norm, ref_te)),
               "train_seconds": ref_log.seconds, "steps": ref_log.steps,
               "encoder_relative_change": ref_log.encoder_change}
        return row, ref_file

    def decoders(self, layer: str, acts_tr: torch.Tensor, acts_te: torch.Tensor) -> list[tuple[dict[str, Any], str | None]]:
        """Every alpha's decoder of the layer after a shared first half of the budget (MSE
        alone): its sweep row and, for a served alpha, its exported file (else None)."""
        cfg, tr, spec = self.cfg, self.tr, self.spec
        act_shape = tuple(acts_tr.shape[1:])
        steps = train_steps(len(tr), cfg)
        base, base_log = (train_decoder(acts_tr, tr, spec, cfg, 0.0, self.model, self.progress,
                                        f"ClaDec {layer} start", steps // 2) if steps >= 2 else (None, None))
        out: list[tuple[dict[str, Any], str | None]] = []
        for alpha in sorted(set(cfg.alphas) | set(cfg.sweep_alphas)):
            served = alpha in cfg.alphas
            dec, log = train_decoder(acts_tr, tr, spec, cfg, alpha, self.model, self.progress,
                                     f"ClaDec {layer} a={alpha:g}", steps - (steps // 2 if base is not None else 0),
                                     base)
            cla_te = reconstruct(dec, acts_te)
            row: dict[str, Any] = {
                "layer": layer, "alpha": alpha, "served": served, **self.scores(cla_te, self.fresh(dec, acts_tr, cla_te)),
                "steps": log.steps + (base_log.steps if base_log else 0), "own_steps": log.steps,
                "train_seconds": log.seconds, "shared_start_seconds": base_log.seconds if base_log else 0.0}
            file = None
            if served:
                file = _alpha_file(layer.replace(".", "_"), alpha)
                self.export(dec, torch.zeros(2, *act_shape), file, "activation", nonneg=True)
            out.append((row, file))
        return out


def _evaluation_row(row: dict[str, Any], ref_row: dict[str, Any], baselines: dict[str, Any]) -> dict[str, Any]:
    """A served decoder beside its layer's reference autoencoder and the baselines."""
    ceiling = baselines["fresh_classifier_on_real"]
    return {"layer": row["layer"], "alpha": row["alpha"],
            "mse_cladec": row["mse"], "mse_refae": ref_row["mse"],
            "mse_constant_image": baselines["mse_constant_image"],
            "classifier_accuracy_on_cladec": row["classifier_accuracy"],
            "classifier_accuracy_on_refae": ref_row["classifier_accuracy"],
            "fresh_classifier_accuracy_on_cladec": row["fresh_classifier_accuracy"],
            "fresh_classifier_accuracy_on_refae": ref_row["fresh_classifier_accuracy"],
            "fresh_classifier_accuracy_on_real": None if ceiling is None else ceiling["accuracy"],
            "train_seconds_cladec": round(row["train_seconds"] + row["shared_start_seconds"], 1),
            "train_seconds_refae": ref_row["train_seconds"]}


def build_cladec(model: nn.Module, model_factory: ModelFactory, spec: InputSpec, train: ImageDataset,
                 test: ImageDataset, out: Path, cfg: ClaDecConfig, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate and export every decoder. Writes ONNX files and ``cladec.json`` into ``out``.

    Served: one decoder per layer and alpha of ``cfg.alphas`` and one RefAE per layer (ONNX,
    checked against torch with onnxruntime). Report: ``evaluation`` (served rows, the keys
    of earlier versions plus the baselines), ``sweep`` (every alpha of ``alphas`` and
    ``sweep_alphas``), ``refae`` (per layer) and ``baselines`` (constant image, the
    classifier on the real images, the fresh classifier on the real images)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    run = _ClaDecBuild(model, model_factory, spec, _subset(train, cfg.train_images, cfg.seed),
                       _subset(test, cfg.eval_images, cfg.seed + 1), out, cfg, progress)
    t_all = time.perf_counter()
    baselines = run.baselines()
    entries, evaluation, sweep, refaes = [], [], [], []
    for layer in cfg.layers:
        acts_tr = _activations(model, layer, run.tr, spec)
        acts_te = _activations(model, layer, run.te, spec)
        ref_row, ref_file = run.refae(layer, tuple(acts_tr.shape[1:]))
        refaes.append(ref_row)
        for row, dec_file in run.decoders(layer, acts_tr, acts_te):
            sweep.append(row)
            if dec_file is not None:
                evaluation.append(_evaluation_row(row, ref_row, baselines))
                entries.append({"layer": layer, "alpha": row["alpha"], "decoder_file": dec_file, "refae_file": ref_file})
    # Pixels in [0, 1], served as 8-bit images (one level = 3.9e-3): float32 differences of a
    # few 1e-4 through the transposed convolutions cannot move a served pixel by a level.
    bad = {k: v for k, v in run.parity.items() if v > CLADEC_PARITY}
    if bad:
        raise RuntimeError(f"ClaDec ONNX files differ from torch: {bad}")
    report = {"config": {**asdict(cfg), "layers": list(cfg.layers), "alphas": list(cfg.alphas),
                         "sweep_alphas": list(cfg.sweep_alphas)},
              "evaluation": evaluation, "sweep": sweep, "refae": refaes, "baselines": baselines,
              "onnx_parity_max_abs_diff": run.parity,
              "train_images": len(run.tr), "eval_images": len(run.te), "seconds": round(time.perf_counter() - t_all, 1)}
    (out / "cladec.json").write_text(json.dumps({"format": CLADEC_FORMAT, "decoders": entries, "report": report},
                                                indent=1) + "\n")
    return report


def _acc(v: float | None) -> str:
    return "skipped" if v is None else f"{v:.4f}"


def format_report(report: dict[str, Any]) -> str:
    """The served table (one row per served decoder), then, when present, the baselines and
    the alpha sweep with each layer's RefAE."""
    lines = ["layer     alpha   MSE ClaDec  MSE RefAE  acc(f) ClaDec  acc(f) RefAE  fresh ClaDec  fresh RefAE",
             "-" * 94]
    for e in report["evaluation"]:
        lines.append(f"{e['layer']:<9} {e['alpha']:<7g} {e['mse_cladec']:10.4f} {e['mse_refae']:10.4f} "
                     f"{e['classifier_accuracy_on_cladec']:14.4f} {e['classifier_accuracy_on_refae']:13.4f} "
                     f"{_acc(e['fresh_classifier_accuracy_on_cladec']):>13} {_acc(e['fresh_classifier_accuracy_on_refae']):>12}")
    base = report.get("baselines")
    if base:
        ceil = base.get("fresh_classifier_on_real")
        lines += ["", f"constant (training-mean) image MSE {base['mse_constant_image']:.4f}; "
                      f"classifier on real images {base['classifier_accuracy_on_real']:.4f}; "
                      f"fresh classifier on real images, same budget (ceiling) "
                      f"{_acc(None if ceil is None else ceil['accuracy'])}"]
    if report.get("sweep"):
        lines += ["", "alpha sweep    steps  MSE     acc(f)   fresh   (fresh epochs: best/run, stop)", "-" * 79]
        for layer in dict.fromkeys(r["layer"] for r in report["sweep"]):
            rows = [("RefAE", r) for r in report.get("refae", []) if r["layer"] == layer]
            rows += [(f"a={r['alpha']:g}", r) for r in report["sweep"] if r["layer"] == layer]
            for name, r in rows:
                fc = r.get("fresh_classifier")
                how = "" if fc is None else f"{fc['best_epoch']}/{fc['epochs_run']}, {fc['stopped']}"
                lines.append(f"{layer:<9} {name:<8} {r.get('steps', ''):>5}  {r['mse']:.4f} "
                             f"{r['classifier_accuracy']:8.4f} "
                             f"{_acc(r['fresh_classifier_accuracy']):>8}   {how}")
    return "\n".join(lines)
