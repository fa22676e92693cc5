"""Every built-in architecture of issue 18 and its variants at tiny widths, for the tests of
FA/DFA on them (tests/test_architectures.py) and of graph AR on them
(tests/test_graph_ar_models.py). Each ResNet stage has at least 2 channels: with 1, the first
BatchNorm's weight gradient is exactly zero by symmetry, so a relative comparison of it would
rest on rounding noise."""

# (name, input shape, tiny options)
TINY_MODELS = [
    ("resnet20", (3, 8, 8), {"width": 2}),
    ("resnet20", (3, 8, 8), {"width": 2, "shortcut": "B"}),
    ("resnet56", (3, 8, 8), {"width": 2}),
    ("resnet18", (3, 8, 8), {"width": 2}),
    ("resnet18", (1, 8, 8), {"width": 2, "shortcut": "A"}),
    ("vit-tiny", (1, 28, 28), {"dim": 8, "depth": 2, "heads": 2, "patch": 7}),
    ("vit-tiny", (3, 32, 32), {"dim": 8, "depth": 1, "heads": 2, "patch": 4, "mlp_ratio": 2}),
    ("vit-tiny", (1, 28, 28), {"dim": 8, "depth": 1, "heads": 2, "patch": 7, "attention": "torch"}),
    ("lstm-smnist", (1, 28, 28), {"hidden": 6}),
    ("lstm-smnist", (784,), {"hidden": 5, "layers": 2}),
    ("lenet-biotorch", (1, 28, 28), {}),  # issue 22: BioTorch's MNIST LeNet (resized to 32x32 inside)
    ("vgg5", (3, 16, 16), {"width": 2}),  # issue 22: PCX's VGG-5 (CIFAR-10 at width 128)
]
TINY_IDS = [f"{n}-{'x'.join(map(str, s))}" + "".join(f"-{k}={v}" for k, v in o.items()) for n, s, o in TINY_MODELS]
