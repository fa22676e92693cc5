"""A user model factory that records the default dtype it was built under (tests of
``check`` and ``bench``: a model is initialised in the run's dtype, not drawn in float32 and cast)."""

import torch
from torch import nn

BUILT_UNDER: list[torch.dtype] = []


def make(in_shape, num_classes):
    BUILT_UNDER.append(torch.get_default_dtype())
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(in_shape).prod()), num_classes))
