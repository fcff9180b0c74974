"""The FID classifier: learns, is byte-deterministic on CPU, round-trips through its checkpoint,
and its Frechet distance ranks image sets sensibly. Synthetic images keep it fast."""

from __future__ import annotations

import pytest
import torch

from genmodels.configs.base import ConfigError, from_mapping
from genmodels.metrics.classifier import (
    extract_features,
    fid,
    load_classifier,
    save_classifier,
    seeded_split,
    train_classifier,
)
from genmodels.metrics.config import ClassifierConfig, EvaluateConfig
from genmodels.metrics.frechet import frechet_from_features


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (n, 28, 28): class k = a bright 8x8 square at one of ten places, on noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randint(0, 80, (n, 28, 28), generator=g)
    for k in range(10):
        r, c = 2 + 9 * (k // 4), 2 + 6 * (k % 4)
        x[y == k, r : r + 8, c : c + 8] += 150
    return x.clamp(0, 255).to(torch.uint8), y


def tiny_train(seed: int = 0):  # noqa: ANN201 - ClassifierResult
    x, y = synthetic(1200, 1)
    xtr, ytr, xte, yte = seeded_split(x, y, 0.25, seed=3)
    return train_classifier(xtr, ytr, xte, yte, epochs=2, batch_size=64, lr=3e-3, feature_dim=32, seed=seed)


def test_classifier_learns_and_is_deterministic(tmp_path) -> None:  # noqa: ANN001
    a, b = tiny_train(), tiny_train()
    assert a.test_accuracy > 0.9, a.test_accuracy  # chance is 0.1
    assert a.n_train == 900 and a.n_test == 300
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    c = tiny_train(seed=1)
    assert not torch.equal(c.model.head.weight, a.model.head.weight)  # the seed matters

    path = tmp_path / "clf.pt"
    save_classifier(path, a, {"channels": [16, 32], "feature_dim": 32})
    model, info = load_classifier(path)
    x, _ = synthetic(50, 9)
    assert torch.equal(extract_features(model, x), extract_features(a.model, x))
    assert info["test_accuracy"] == a.test_accuracy and info["n_train"] == 900


def test_fid_ranks_image_sets() -> None:
    res = tiny_train()
    x, y = synthetic(2000, 5)
    zeros, fives = x[y == 0], x[y == 5]
    half = zeros.shape[0] // 2
    same_class = fid(res.model, zeros[:half], zeros[half:])
    other_class = fid(res.model, zeros[:half], fives)
    assert fid(res.model, zeros, zeros) == pytest.approx(0.0, abs=1e-8)
    assert other_class > 10 * same_class
    feats = extract_features(res.model, zeros)
    assert feats.shape == (zeros.shape[0], 32) and feats.dtype == torch.float64
    assert fid(res.model, zeros[:half], fives) == pytest.approx(
        frechet_from_features(feats[:half], extract_features(res.model, fives))
    )


def test_seeded_split_is_disjoint_and_reproducible() -> None:
    x = torch.arange(100).view(100, 1, 1).expand(100, 28, 28).to(torch.uint8)
    y = torch.arange(100) % 10
    a = seeded_split(x, y, 0.2, seed=7)
    b = seeded_split(x, y, 0.2, seed=7)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    tr, te = set(a[0][:, 0, 0].tolist()), set(a[2][:, 0, 0].tolist())
    assert len(te) == 20 and len(tr) == 80 and not tr & te


def test_configs_reject_bad_values() -> None:
    assert from_mapping(EvaluateConfig, {}, "evaluate").n_samples == 16384
    with pytest.raises(ConfigError, match="evaluate.mmd_bandwidths"):
        from_mapping(EvaluateConfig, {"mmd_bandwidths": [0.1, -1]}, "evaluate")
    with pytest.raises(ConfigError, match="classifier.mnist_test_fraction"):
        from_mapping(ClassifierConfig, {"mnist_test_fraction": 1.5}, "classifier")
    with pytest.raises(ConfigError, match="classifier.epoch"):
        from_mapping(ClassifierConfig, {"epoch": 3}, "classifier")
