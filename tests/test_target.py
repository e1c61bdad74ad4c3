"""The target data opened for training: class weights, rebatching."""

from __future__ import annotations

import numpy as np
import torch
from test_train import toy_data

from medmerge.data.loader import ArrayBatches


def test_inverse_frequency_weights() -> None:
    from medmerge.data.target import inverse_frequency_weights

    weights = inverse_frequency_weights(np.array([0, 0, 0, 1]), 3)
    torch.testing.assert_close(weights, torch.tensor([4 / 9, 4 / 3, 0.0]))
    torch.testing.assert_close(inverse_frequency_weights(np.array([0, 1, 2]), 3), torch.ones(3))


def test_rebatching_the_training_split_starts_it_afresh() -> None:
    """``TargetData.with_train_batch_size`` after a used loader gives the batches a newly opened split would:
    the merge stage opens the target once for its three steps."""
    from medmerge.data.target import TargetData

    images, labels = toy_data()
    opened = lambda batch: ArrayBatches(images, labels, batch, shuffle=True, seed=3, drop_last=True)  # noqa: E731
    data = TargetData(opened(16), ArrayBatches(images, labels, 64), ArrayBatches(images, labels, 64), ["a", "b"])
    list(data.train)  # one epoch drawn: a reused loader would continue with epoch 2's order
    again = data.with_train_batch_size(24)
    assert again.val is data.val and again.train.batch_size == 24 and again.train.drop_last
    assert [b[1].tolist() for b in again.train] == [b[1].tolist() for b in opened(24)]
    assert not data.with_train_batch_size(len(labels)).train.drop_last  # one batch holds the whole split
