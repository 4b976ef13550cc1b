"""See the engine work in a few seconds: ``python -m lrp_core.demo --out reports/lrp_demo.png``.

A small CNN learns to tell horizontal from vertical bars on noisy backgrounds. Half of the "vertical" training
images also carry a bright corner stamp, a cue the network may use instead of the bar (a Clever Hans). The demo
explains test images, with and without the stamp, under each composite and writes one PNG grid: inputs on top,
then a heatmap row per composite (red: evidence for the explained class, blue: against). It prints accuracy and the
per-layer relevance sums of one sample, so conservation can be read off.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from . import composites, explain
from .visualize import grid, heatmap_rgb, image_rgb, write_png

SIZE = 32


def make_images(n: int, generator: torch.Generator, stamp_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bars on noise: label 0 horizontal, label 1 vertical; ``stamp_fraction`` of label-1 images get a corner stamp."""
    x = 0.3 * torch.rand(n, 1, SIZE, SIZE, generator=generator)
    y = torch.randint(0, 2, (n,), generator=generator)
    pos = torch.randint(6, SIZE - 6, (n, 2), generator=generator)
    length = torch.randint(10, 18, (n,), generator=generator)
    for i in range(n):
        r, c, half = int(pos[i, 0]), int(pos[i, 1]), int(length[i]) // 2
        lo_r, hi_r = max(r - half, 0), min(r + half, SIZE)
        lo_c, hi_c = max(c - half, 0), min(c + half, SIZE)
        if y[i] == 0:
            x[i, 0, r - 1 : r + 2, lo_c:hi_c] = 1.0
        else:
            x[i, 0, lo_r:hi_r, c - 1 : c + 2] = 1.0
    stamped = (y == 1) & (torch.rand(n, generator=generator) < stamp_fraction)
    x[stamped, 0, 1:5, 1:5] = 1.0
    return x.expand(-1, 3, -1, -1).clone(), y


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.ReLU(),
        nn.Linear(64, 2),
    )


def train(model: nn.Module, steps: int, generator: torch.Generator) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x, y = make_images(64, generator, stamp_fraction=0.5)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/lrp_demo.png", help="where to write the PNG grid")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the small CNN")
    parser.add_argument("--images", type=int, default=8, help="how many test images to explain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = make_model()
    start = time.perf_counter()
    train(model, args.steps, generator)
    x_test, y_test = make_images(512, generator, stamp_fraction=0.0)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        x_stamped = x_test.clone()
        x_stamped[:, :, 1:5, 1:5] = 1.0
        stamped_as_vertical = (model(x_stamped[y_test == 0]).argmax(1) == 1).float().mean().item()
    print(
        f"trained in {time.perf_counter() - start:.1f}s; test accuracy {accuracy:.3f}; "
        f"horizontal bars called vertical once stamped: {stamped_as_vertical:.3f}"
    )

    half = args.images // 2
    x = torch.cat([x_test[:half], x_stamped[half : args.images]])
    target = model(x).argmax(1)
    choices = {
        "EpsilonPlusFlat": composites.EpsilonPlusFlat(),
        "EpsilonGammaBox": composites.EpsilonGammaBox(low=0.0, high=1.0),
        "EpsilonAlpha2Beta1": composites.EpsilonAlpha2Beta1(),
    }
    rows = [image_rgb(x)]
    for name, composite in choices.items():
        explanation = explain(model, x, target, composite=composite, record_layers=(name == "EpsilonPlusFlat"))
        rows.append(heatmap_rgb(explanation.relevance))
        if explanation.layers is not None:
            print(f"\nper-layer relevance ({name}, mean over the batch):")
            print(explanation.conservation_table())
    path = write_png(args.out, grid(rows, scale=3))
    print(f"\nwrote {path}: row 1 inputs (right half stamped), then {', '.join(choices)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
