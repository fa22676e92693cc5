"""Recurrent models: ``lstm-smnist``, row-by-row sequential MNIST.

The image is read one row per time step: a 1x28x28 MNIST digit is 28 steps of 28 features
(for C x H x W input, H steps of C*W features: the C channels of one row side by side; for a
flat input of n features, ``rows`` steps, by default sqrt(n) when n is a square). An
``nn.LSTM`` (``hidden`` units, ``layers`` stacked layers, batch_first) reads the sequence and a
linear head maps the last time step's hidden state to the classes. The forward accepts the
batch as (B, C, H, W) or flat (B, C*H*W).

Feedback alignment and DFA can route only the head (``nn.LSTM``'s ``weight_ih_l*`` /
``weight_hh_l*`` are raw parameters used inside one fused operation), so they refuse this
model by name; with ``unrouted=autograd`` (e.g. ``fa:unrouted=autograd``) the LSTM is trained
by autograd (backprop through time) from the error that the head's feedback sends it.
Written for ``torch.fx`` (the LSTM is a leaf module; no in-place operations).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.models import register_model


class RowLSTM(nn.Module):
    def __init__(self, channels: int, rows: int, cols: int, hidden: int, layers: int, num_classes: int):
        super().__init__()
        self.channels, self.rows, self.cols = channels, rows, cols
        self.lstm = nn.LSTM(channels * cols, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, H, W) or (B, C*H*W) -> (B, H, C*W): one row (all channels) per time step
        seq = x.reshape(-1, self.channels, self.rows, self.cols).transpose(1, 2).flatten(2)
        out = self.lstm(seq)[0]  # (B, H, hidden)
        return self.head(out[:, -1])


def _shape(in_shape, rows) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) == 3:
        c, h, w = shape
        if rows is not None and int(rows) != h:
            raise ConfigError(f"model 'lstm-smnist': rows={rows} but the image has {h} rows (in_shape={shape})")
        return c, h, w
    n = math.prod(shape)
    if rows is None:
        r = math.isqrt(n)
        if r * r != n:
            raise ConfigError(f"model 'lstm-smnist': input of {n} features is not a square image; give the "
                              "option rows (time steps; the features per step are n / rows)")
    else:
        r = int(rows)
        if r < 1 or n % r:
            raise ConfigError(f"model 'lstm-smnist': rows={rows} must divide the {n} input features")
    return 1, r, n // r


@register_model("lstm-smnist", "row-by-row sequential MNIST: 28 steps of 28 pixels into an nn.LSTM, linear head on the "
                               "last hidden state; options hidden, layers, rows")
def lstm_smnist(in_shape, num_classes, hidden: int = 128, layers: int = 1, rows: int | None = None):
    for v, k in ((hidden, "hidden"), (layers, "layers")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"model 'lstm-smnist': {k}={v!r} must be an integer >= 1")
    c, h, w = _shape(in_shape, rows)
    return RowLSTM(c, h, w, hidden, layers, num_classes)
