"""Models for the data-parallel failure tests: each misbehaves on rank 1 only."""

import os

import torch
from torch import nn


class _Tiny(nn.Module):
    def __init__(self, in_shape, num_classes):
        super().__init__()
        n = 1
        for s in in_shape:
            n *= int(s)
        self.fc1, self.fc2 = nn.Linear(n, 8), nn.Linear(8, num_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.misbehave()
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))

    def misbehave(self):
        pass


class DriftsOnRank1(_Tiny):
    """Rank 1 nudges one weight by one ulp-sized amount at its 3rd forward pass."""

    def misbehave(self):
        if os.environ.get("RANK") == "1" and self.calls == 3:
            with torch.no_grad():
                self.fc2.weight[0, 0] += 1e-9


class DiesOnRank1(_Tiny):
    """Rank 1 exits abruptly at its 3rd forward pass (a crashed process)."""

    def misbehave(self):
        if os.environ.get("RANK") == "1" and self.calls == 3:
            os._exit(17)


def drifts(in_shape, num_classes):
    return DriftsOnRank1(in_shape, num_classes)


def dies(in_shape, num_classes):
    return DiesOnRank1(in_shape, num_classes)
