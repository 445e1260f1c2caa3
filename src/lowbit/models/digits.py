"""A small CNN on scikit-learn's bundled handwritten digits (8x8 grey images, 10 classes, 1797
samples): real labelled data for the classifier PTQ / QAT measurements, no download.

    X_train, y_train, X_test, y_test = digits_split(seed=0)   # 70% / 30%, pixels scaled to [0, 1]
    model = digits_cnn(seed=0); train(model, X_train, y_train, epochs=15)
    accuracy(model, X_test, y_test)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError


def digits_split(seed: int = 0, test_fraction: float = 0.3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(X_train [N, 1, 8, 8] float32 in [0, 1], y_train int64, X_test, y_test), a seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is in the test extra
        raise LowbitError("the digits data set needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return X[tr], y[tr], X[te], y[te]


def digits_cnn(seed: int = 0, width: int = 16) -> nn.Sequential:
    """conv3x3(1->w)+ReLU, maxpool 2, conv3x3(w->2w)+ReLU, maxpool 2, flatten, linear(8w->64)+ReLU,
    linear(64->10). About 14k parameters at width 16."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def train(model: nn.Module, X: Tensor, y: Tensor, epochs: int = 15, lr: float = 3e-3, batch_size: int = 64,
          seed: int = 0, weight_decay: float = 0.0) -> nn.Module:
    """Adam on cross-entropy, seeded shuffles; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for k in range(0, len(y), batch_size):
            idx = perm[k:k + batch_size]
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    return 100.0 * float((model(X).argmax(-1) == y).float().mean())


def float_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
