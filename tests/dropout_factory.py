"""A user model factory with dropout, for tests (``--model tests.dropout_factory:make``)."""

from torch import nn


def make(in_shape, num_classes):
    n = 1
    for s in in_shape:
        n *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(n, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, num_classes))
