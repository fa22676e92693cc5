"""User model factories (``model: {name: "pkg.mod:factory"}``, ``--model pkg.mod:factory``):
each way a factory can be wrong is a one-line ConfigError saying which and what a factory must
look like; a module in the current folder is found as ``python -m`` finds it."""

import os
import sys
import textwrap

import pytest
import torch
import yaml

from creditlab.build import build_model
from creditlab.cli import main
from creditlab.config import resolve
from creditlab.errors import ConfigError
from creditlab.models import build_named_model
from creditlab.train import train

DATA = "fake:n=60,classes=3,shape=1x4x4,test=20"
FORM = r"in_shape: tuple, num_classes: int, \*\*options"

GOOD = """
    from torch import nn

    def make(in_shape, num_classes, hidden=8):
        n = 1
        for s in in_shape:
            n *= s
        return nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))
"""


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """write(name, source): a module file in tmp_path/mods, importable (that folder is on sys.path);
    the test's modules (named um_*) are forgotten afterwards."""
    folder = tmp_path / "mods"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    def write(name, source, where=folder):
        (where / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    yield write
    for name in [m for m in sys.modules if m.startswith("um_")]:
        sys.modules.pop(name, None)


def _cfg(name, task="classify", **options):
    return resolve({"dataset": DATA, "model": {"name": name, "options": options}, "algo": "bp", "epochs": 1,
                    "batch_size": 20, "log_every": 0, "threads": 1, "task": task})


def _build(name, num_out=3, task="classify", **options):
    return build_model(_cfg(name, task, **options), (1, 4, 4), num_out)


def test_a_good_user_factory_builds_and_trains(modules, tmp_path):
    modules("um_good", GOOD)
    model = _build("um_good:make", hidden=5)
    assert model.training and model[1].out_features == 5
    s = train(_cfg("um_good:make"), tmp_path / "run", progress=False)
    assert s["epochs"] == 1


def test_user_factory_with_wrong_signature_is_refused_by_name(modules):
    modules("um_sig", """
        from torch import nn

        def one_arg(in_shape):
            return nn.Linear(16, 3)

        def no_options(in_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))
    """)
    with pytest.raises(ConfigError, match=rf"'um_sig:one_arg' has the signature \(in_shape\).*{FORM}"):
        _build("um_sig:one_arg")
    with pytest.raises(ConfigError, match=r"no_options.*unexpected keyword argument 'hidden'.*must look like"):
        _build("um_sig:no_options", hidden=4)


def test_a_type_error_inside_a_factory_is_reported_as_its_own_not_as_a_wrong_signature(modules):
    modules("um_body", """
        def make(in_shape, num_classes):
            return len(5)
    """)
    with pytest.raises(ConfigError) as e:
        _build("um_body:make")
    msg = str(e.value)
    assert "raised TypeError: object of type 'int' has no len()" in msg and "um_body.py:3" in msg
    assert "signature" not in msg and "\n" not in msg


def test_user_factory_returning_a_non_module_is_refused(modules):
    modules("um_ret", """
        def make(in_shape, num_classes):
            return "a model"
    """)
    with pytest.raises(ConfigError, match=rf"'um_ret:make' returned str, not a torch.nn.Module.*{FORM}"):
        _build("um_ret:make")


def test_user_model_output_width_must_match_the_classes_or_the_input_features(modules):
    modules("um_width", """
        from torch import nn

        def five(in_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(16, 5))

        def per_class(in_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))

        def image_out(in_shape, num_classes):
            return nn.Conv2d(1, num_classes, 1)
    """)
    with pytest.raises(ConfigError, match=r"outputs of shape \(2, 5\).*the data has 3 classes.*\(batch, 3\)"):
        _build("um_width:five")
    with pytest.raises(ConfigError, match=r"outputs of shape \(2, 3, 4, 4\)"):
        _build("um_width:image_out")
    # task autoencode: the output width is the input features (build_model is given num_out=16)
    assert _build("um_width:per_class", num_out=16, task="autoencode")[1].out_features == 16
    with pytest.raises(ConfigError, match=r"data has 16 input features \(task: autoencode\)"):
        _build("um_width:five", num_out=16, task="autoencode")
    with pytest.raises(ConfigError, match=r"fails on a zero batch of the data's shape \(2, 1, 8, 8\): RuntimeError"):
        build_named_model("um_width:five", (1, 8, 8), 5)


def test_the_output_check_leaves_modes_buffers_and_the_rng_as_they_were(modules):
    modules("um_state", """
        import torch
        from torch import nn

        class Noisy(nn.Module):
            def __init__(self):
                super().__init__()
                self.bn, self.fc, self.drop = nn.BatchNorm1d(16), nn.Linear(16, 3), nn.Dropout(0.5)
                self.drop.eval()  # one submodule deliberately in eval mode

            def forward(self, x):
                return self.fc(self.drop(self.bn(x.flatten(1)))) + torch.rand(())

        def make(in_shape, num_classes):
            return Noisy()
    """)
    torch.manual_seed(0)
    model = build_named_model("um_state:make", (1, 4, 4), 3)
    after_build = torch.rand(3)
    torch.manual_seed(0)
    from um_state import make

    make((1, 4, 4), 3)
    assert torch.equal(torch.rand(3), after_build)  # the check drew no random numbers
    assert model.training and model.bn.training and model.fc.training and not model.drop.training
    assert int(model.bn.num_batches_tracked) == 0 and torch.equal(model.bn.running_mean, torch.zeros(16))


def test_a_module_in_the_current_folder_is_imported_as_python_m_would(tmp_path, monkeypatch, modules):
    here = tmp_path / "project"
    here.mkdir()
    modules("um_cwd", GOOD, where=here)
    monkeypatch.chdir(here)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.realpath(p or ".") != str(here.resolve())])
    first = sys.path[0]
    model = build_named_model("um_cwd:make", (1, 4, 4), 3)
    assert isinstance(model, torch.nn.Module)
    assert sys.path[0] == first and sys.path[-1] == str(here)  # appended: installed packages keep precedence


def test_a_module_that_cannot_be_found_says_its_folder_must_be_on_pythonpath(tmp_path, monkeypatch, modules):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no module named 'um_nowhere'.*must be on PYTHONPATH"):
        build_named_model("um_nowhere.sub:make", (1, 4, 4), 3)
    modules("um_pkgless", GOOD)
    with pytest.raises(ConfigError, match=r"has no attribute 'build'; its functions and classes: make"):
        build_named_model("um_pkgless:build", (1, 4, 4), 3)
    with pytest.raises(ConfigError, match=r"write a factory of your own as package.module:function"):
        build_named_model("um_pkgless:", (1, 4, 4), 3)


def test_an_import_error_inside_the_users_module_is_reported_as_that(modules):
    modules("um_dep", """
        import um_missing_dependency_xyz

        def make(in_shape, num_classes):
            pass
    """)
    modules("um_name", """
        from os import no_such_name

        def make(in_shape, num_classes):
            pass
    """)
    with pytest.raises(ConfigError) as e:
        build_named_model("um_dep:make", (1, 4, 4), 3)
    msg = str(e.value)
    assert "importing module 'um_dep' failed: No module named 'um_missing_dependency_xyz'" in msg
    assert "an import inside um_dep" in msg and "PYTHONPATH" not in msg
    with pytest.raises(ConfigError, match=r"importing module 'um_name' failed: cannot import name 'no_such_name'"):
        build_named_model("um_name:make", (1, 4, 4), 3)


def test_a_bad_user_factory_on_the_command_line_is_one_line_exit_2(modules, tmp_path, capsys):
    modules("um_cli", """
        def make(in_shape):
            pass
    """)
    cfg = {"dataset": DATA, "model": {"name": "um_cli:make"}, "algo": "bp", "epochs": 1, "log_every": 0}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("creditlab: model factory 'um_cli:make' has the signature")
