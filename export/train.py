"""Classifier training on an :class:`export.data.loader.ImageDataset` (CPU friendly)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from export.data.loader import ImageDataset
from export.device import autocast, device_of, is_mixed, to_numpy
from handlers.runtime.imaging import InputSpec, normalize


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: AdamW with a one-cycle learning-rate schedule."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 5e-4
    seed: int = 0
    max_steps: int | None = None  # stop early after this many steps (tests, smoke runs)
    # "bf16": forward and loss under bfloat16 autocast with channels-last tensors, weights and
    # optimiser in float32 (mixed precision). On a CPU with AMX (this project's 2-core
    # machine) a ResNet-18-sized step at 224 px, batch 64, took 1.09 s against 4.35 s in fp32.
    precision: str = "fp32"


def one_cycle(opt: torch.optim.Optimizer, max_lr: float, total_steps: int, pct_start: float = 0.25):
    """One-cycle learning-rate schedule that also works for very short runs (tiny data sets):
    the warm-up lasts at least two steps, and runs under five steps keep a constant rate."""
    if total_steps < 5:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)
    pct = min(max(pct_start, 2.5 / total_steps), 0.5)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps, pct_start=pct)


@dataclass
class TrainResult:
    test_accuracy: float
    seconds: float
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)


def batches(ds: ImageDataset, spec: InputSpec, batch_size: int, order: np.ndarray | None = None,
            device: torch.device | None = None):
    """Yield (x float32 (B, C, H, W) tensor, y int64 (B,) tensor) in ``order``, on ``device``
    (default: the CPU)."""
    order = np.arange(len(ds)) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x, y = torch.from_numpy(normalize(ds.pixels[idx], spec)), torch.from_numpy(ds.labels[idx])
        yield (x, y) if device is None else (x.to(device), y.to(device))


@torch.no_grad()
def predict_logits(model: nn.Module, ds: ImageDataset, spec: InputSpec, batch_size: int = 256) -> np.ndarray:
    """Logits (N, K) of the model in eval mode (run on the model's device)."""
    model.eval()
    return np.concatenate([to_numpy(model(x)) for x, _ in batches(ds, spec, batch_size, device=device_of(model))])


def accuracy(model: nn.Module, ds: ImageDataset, spec: InputSpec) -> float:
    return float((predict_logits(model, ds, spec).argmax(1) == ds.labels).mean())


def train_classifier(model: nn.Module, train: ImageDataset, test: ImageDataset, spec: InputSpec,
                     cfg: TrainConfig = TrainConfig(), progress: bool = True) -> TrainResult:
    """Train in place with cross-entropy, on the model's device; evaluate on ``test`` after each epoch."""
    torch.manual_seed(cfg.seed)
    device = device_of(model)
    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = one_cycle(opt, cfg.lr, max(total, 1), 0.25)
    loss_fn = nn.CrossEntropyLoss()
    mixed = is_mixed(cfg.precision, device)
    layout = torch.channels_last if mixed else torch.contiguous_format
    model.to(memory_format=layout)  # type: ignore[call-overload]  # (missing from torch's stubs)
    t0 = time.perf_counter()
    step = 0
    history: list[dict[str, float]] = []
    bar = tqdm(total=total, desc="train", disable=not progress, unit="step")
    for epoch in range(cfg.epochs):
        model.train()
        running, n_steps = 0.0, 0
        for x, y in batches(train, spec, cfg.batch_size, rng.permutation(len(train)), device):
            with autocast(device, mixed):
                loss = loss_fn(model(x.contiguous(memory_format=layout)).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
            n_steps += 1
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}")
            if step >= total:
                break
        acc = accuracy(model, test, spec)
        history.append({"epoch": epoch + 1, "loss": running / max(n_steps, 1),
                        "test_accuracy": acc})
        bar.set_postfix(epoch=epoch + 1, test_acc=f"{acc:.4f}")
        if step >= total:
            break
    bar.close()
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    model.eval()
    return TrainResult(history[-1]["test_accuracy"], time.perf_counter() - t0, step, history)
