"""LRP on an LSTM in a few seconds: ``python -m lrp_core.sequence_demo``.

A synthetic task whose answer is known: each sequence holds ``length`` tokens, all noise but one *marker* token at a
random position; the class is which of ``classes`` markers it is. An LSTM reads the one-hot tokens and must carry
the marker to the last step. The demo trains it, explains the test sequences with ``lrp_core.attribute`` and
reports how often the most relevant token is the marker (it should be nearly always), then prints a few sequences
with each token's relevance.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attribute, composites

__all__ = [
    "MarkerTask",
    "LastStep",
    "marker_lstm",
    "make_marker_sequences",
    "train_marker_lstm",
    "token_relevance",
    "hit_rate",
]


@dataclass(frozen=True)
class MarkerTask:
    """Sizes of the synthetic task: ``noise`` filler tokens, then one marker token per class."""

    length: int = 16
    noise: int = 10
    classes: int = 3

    @property
    def vocabulary(self) -> int:
        return self.noise + self.classes


def make_marker_sequences(task: MarkerTask, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """One-hot sequences ``(n, length, vocabulary)``, labels ``(n,)`` and the marker positions ``(n,)``."""
    tokens = torch.randint(0, task.noise, (n, task.length), generator=generator)
    labels = torch.randint(0, task.classes, (n,), generator=generator)
    positions = torch.randint(0, task.length, (n,), generator=generator)
    tokens[torch.arange(n), positions] = task.noise + labels
    return F.one_hot(tokens, task.vocabulary).double(), labels, positions


class LastStep(nn.Module):
    """A batch-first recurrent layer and a linear read-out of its output at the last step."""

    def __init__(self, rnn: nn.LSTM | nn.GRU, classes: int):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), classes)

    def forward(self, x: Tensor) -> Tensor:
        sequence, _ = self.rnn(x)
        return self.head(sequence[:, -1])


def marker_lstm(task: MarkerTask, hidden: int = 24) -> LastStep:
    """One LSTM layer on the one-hot tokens, read out at the last step."""
    return LastStep(nn.LSTM(task.vocabulary, hidden, batch_first=True), task.classes)


def train_marker_lstm(task: MarkerTask, n_train: int = 2000, epochs: int = 12, seed: int = 0) -> LastStep:
    """Adam on cross-entropy; a few seconds on two CPU cores. Returned in eval mode, float64."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = marker_lstm(task).double()
    x, y, _ = make_marker_sequences(task, n_train, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=generator)
        for start in range(0, n_train, 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def token_relevance(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Relevance per token ``(n, length)``: the LRP map summed over the one-hot dimension."""
    return attribute(model, x, target, composite=composites.EpsilonPlus()).sum(-1)


def hit_rate(relevance: Tensor, positions: Tensor) -> float:
    """Fraction of sequences whose most relevant token is the marker."""
    return (relevance.argmax(1) == positions).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=int, default=500, help="test sequences")
    parser.add_argument("--show", type=int, default=4, help="sequences to print")
    args = parser.parse_args()
    task = MarkerTask()
    start = time.perf_counter()
    model = train_marker_lstm(task)
    x, y, positions = make_marker_sequences(task, args.test, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).double().mean().item()
    relevance = token_relevance(model, x, y)
    print(f"trained in {time.perf_counter() - start:.1f} s; test accuracy {accuracy:.3f}")
    print(f"most relevant token is the marker in {hit_rate(relevance, positions):.1%} of {args.test} sequences")
    tokens = x.argmax(-1)
    for i in range(min(args.show, args.test)):
        cells = [f"{'M' if t >= task.noise else ''}{int(t)}:{r:+.2f}" for t, r in zip(tokens[i].tolist(), relevance[i])]
        print(f"class {int(y[i])}, marker at {int(positions[i])}: " + " ".join(cells))


if __name__ == "__main__":
    main()
