"""The one-row prefix splice (export/splice.py) against the plain full-network splice."""
from __future__ import annotations

import torch
from torch import nn

from export.concepts import capture, spliced_logits
from export.models import build_model
from export.splice import Splice


class _SkipAround(nn.Module):
    """A network whose head reads a tensor from before ``middle`` (a skip connection around it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.middle = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head((self.middle(s) + s).mean(dim=(2, 3)))


class _BatchFromInput(nn.Module):
    """A network that reshapes with the batch size read from its input."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.head(self.body(x).reshape(n, -1))


def test_one_row_prefix_gives_the_full_splice_on_a_resnet():
    torch.manual_seed(0)
    model = build_model("demo_resnet", 10, 3).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        _, acts = capture(model, ["layer1", "layer2", "layer3"], x)
        for layer in ("layer1", "layer2", "layer3"):
            splice = Splice.checked(model, layer, x[:4])
            assert splice.prefix_rows == 1
            changed = acts[layer] * torch.linspace(0, 2, acts[layer].numel()).reshape(acts[layer].shape)
            torch.testing.assert_close(splice.logits(x, changed), spliced_logits(model, layer, x, changed))
            got, later = splice.capture(x, changed, ["layer3"] if layer != "layer3" else [])
            assert got.shape == (6, 10)
            if layer != "layer3":
                _, ref_later = Splice(model, layer).capture(x, changed, ["layer3"])
                torch.testing.assert_close(later["layer3"], ref_later["layer3"])


def test_gradients_through_the_one_row_splice_match_the_full_splice():
    torch.manual_seed(1)
    model = build_model("demo_resnet", 10, 3).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        _, acts = capture(model, ["layer2"], x)
    grads = []
    for splice in (Splice(model, "layer2"), Splice.checked(model, "layer2", x[:4])):
        rep = acts["layer2"].clone().requires_grad_(True)
        splice.logits(x, rep).logsumexp(1).sum().backward()
        grads.append(rep.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_a_skip_around_the_layer_falls_back_to_the_full_prefix():
    torch.manual_seed(2)
    model = _SkipAround().eval()
    x = torch.randn(4, 3, 8, 8)
    splice = Splice.checked(model, "middle", x)
    assert splice.prefix_rows is None
    with torch.no_grad():
        torch.testing.assert_close(splice.logits(x, model.middle(model.stem(x))), model(x))


def test_a_batch_size_read_from_the_input_falls_back_to_the_full_prefix():
    torch.manual_seed(3)
    model = _BatchFromInput().eval()
    x = torch.randn(3, 3, 8, 8)
    assert Splice.checked(model, "body", x).prefix_rows is None
