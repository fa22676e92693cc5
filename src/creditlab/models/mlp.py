"""Multilayer perceptrons from compact specs such as ``784-300-300-100-10``.

Layer ``l`` (0-based) maps x^l to a_l = W_l x^l + b_l and x^{l+1} = f_l(a_l); x^0 is the
flattened input and x^L the output.  :meth:`MLP.trace` returns every x^l and a_l of one
forward pass, which is what local learning rules work from.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.models.activations import Activation, make_activation
from creditlab.models.init import check_init, init_weight_


def parse_arch(arch: str | list[int]) -> list[int]:
    """``"784-300-10"`` -> ``[784, 300, 10]``."""
    if isinstance(arch, (list, tuple)):
        sizes = [int(s) for s in arch]
    else:
        try:
            sizes = [int(s) for s in str(arch).replace(" ", "").split("-")]
        except ValueError:
            raise ConfigError(f"bad layer spec {arch!r}: expected sizes joined by '-', e.g. '784-300-300-100-10'") from None
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise ConfigError(f"bad layer spec {arch!r}: need at least input and output sizes, all positive")
    return sizes


@dataclass
class Trace:
    """One forward pass: ``xs[l]`` is x^l (l = 0..L), ``pre[l]`` is a_l (l = 0..L-1)."""

    xs: list[Tensor]
    pre: list[Tensor]

    @property
    def out(self) -> Tensor:
        return self.xs[-1]


class MLP(nn.Module):
    """Fully connected network ``sizes[0] -> ... -> sizes[-1]``.

    ``act`` is the hidden activation (or a list, one per hidden layer); ``out_act`` the
    output's. ``softmax`` as output activation means: the module outputs logits and the
    cross-entropy loss applies the softmax.
    """

    def __init__(
        self,
        sizes: list[int] | str,
        act: str | list[str] = "relu",
        out_act: str = "linear",
        bias: bool = True,
        init: str = "xavier",
    ):
        super().__init__()
        sizes = parse_arch(sizes)
        n_hidden = len(sizes) - 2
        acts = [act] * n_hidden if isinstance(act, str) else list(act)
        if len(acts) != n_hidden:
            raise ConfigError(f"{len(acts)} hidden activations given for {n_hidden} hidden layers ({'-'.join(map(str, sizes))})")
        self.sizes = sizes
        self.init_spec = check_init(init)
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=bias) for i, o in zip(sizes[:-1], sizes[1:]))
        self.acts: nn.ModuleList = nn.ModuleList([make_activation(a) for a in acts] + [make_activation(out_act)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            init_weight_(layer.weight, self.init_spec)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    @property
    def activations(self) -> list[Activation]:
        return list(self.acts)  # type: ignore[arg-type]

    def spec(self) -> str:
        acts = ",".join(a.name for a in self.acts)
        bias = self.layers[0].bias is not None
        return f"mlp {'-'.join(map(str, self.sizes))} acts=[{acts}] bias={bias}"

    def flatten_input(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.sizes[0]:
            raise ConfigError(f"input has {x.shape[1]} features per sample but the MLP expects {self.sizes[0]}")
        return x

    def forward(self, x: Tensor) -> Tensor:
        h = self.flatten_input(x)
        for layer, f in zip(self.layers, self.acts):
            h = f(layer(h))
        return h

    def trace(self, x: Tensor) -> Trace:
        xs = [self.flatten_input(x)]
        pre = []
        for layer, f in zip(self.layers, self.acts):
            a = layer(xs[-1])
            pre.append(a)
            xs.append(f(a))
        return Trace(xs, pre)


def require_mlp(model: nn.Module, algo: str) -> MLP:
    if not isinstance(model, MLP):
        raise ConfigError(
            f"algorithm {algo!r} needs an MLP built from a layer spec (model.arch), got {type(model).__name__}; "
            "give --arch (e.g. 784-300-10) instead of --model"
        )
    return model
