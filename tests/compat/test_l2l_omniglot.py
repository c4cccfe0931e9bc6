"""learn2learn's maml_omniglot.py example, with only its import line changed, learns on real Omniglot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn, optim

import metagrad.compat.learn2learn as l2l


def _real_data_dir() -> Path | None:
    """``$METAGRAD_DATA`` or ../shared/data beside the checkout, if it holds ``omniglot/``."""
    candidates = [Path(os.environ["METAGRAD_DATA"])] if os.environ.get("METAGRAD_DATA") else []
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return next((p for p in candidates if (p / "omniglot").is_dir()), None)


def accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    predictions = predictions.argmax(dim=1).view(targets.shape)
    return (predictions == targets).sum().float() / targets.size(0)


def fast_adapt(batch, learner, loss, adaptation_steps, shots, ways):  # untyped, as in learn2learn
    data, labels = batch
    # Separate data into adaptation/evaluation sets by even and odd positions, as learn2learn does.
    adaptation_indices = np.zeros(data.size(0), dtype=bool)
    adaptation_indices[np.arange(shots * ways) * 2] = True
    evaluation_indices = torch.from_numpy(~adaptation_indices)
    adaptation_indices = torch.from_numpy(adaptation_indices)
    adaptation_data, adaptation_labels = data[adaptation_indices], labels[adaptation_indices]
    evaluation_data, evaluation_labels = data[evaluation_indices], labels[evaluation_indices]
    for _ in range(adaptation_steps):
        learner.adapt(loss(learner(adaptation_data), adaptation_labels))
    predictions = learner(evaluation_data)
    return loss(predictions, evaluation_labels), accuracy(predictions, evaluation_labels)


@pytest.mark.slow
@pytest.mark.skipif(_real_data_dir() is None, reason="real Omniglot not in $METAGRAD_DATA or ../shared/data")
def test_maml_omniglot_example_learns() -> None:
    ways, shots, meta_lr, fast_lr, meta_batch_size, adaptation_steps = 5, 1, 0.003, 0.5, 32, 1
    torch.manual_seed(42)
    tasksets = l2l.vision.benchmarks.get_tasksets(
        "omniglot", train_ways=ways, train_samples=2 * shots, test_ways=ways, test_samples=2 * shots,
        num_tasks=20000, root=str(_real_data_dir()),
    )
    model = l2l.vision.models.OmniglotFC(28**2, ways)
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    opt = optim.Adam(maml.parameters(), meta_lr)
    loss = nn.CrossEntropyLoss(reduction="mean")
    for _ in range(150):
        opt.zero_grad()
        for _ in range(meta_batch_size):
            learner = maml.clone()
            error, _ = fast_adapt(tasksets.train.sample(), learner, loss, adaptation_steps, shots, ways)
            error.backward()
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / meta_batch_size)
        opt.step()
    test_accuracy = np.mean([
        fast_adapt(tasksets.test.sample(), maml.clone(), loss, adaptation_steps, shots, ways)[1].item()
        for _ in range(200)
    ])
    assert test_accuracy > 0.5  # chance is 0.2; the full example reached 0.75 after 300 iterations here
