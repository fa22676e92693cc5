"""Config values from the YAML file and from the command line: YAML 1.2 numbers, dotted
``KEY=VALUE`` overrides validated by the schema, and errors that say where a bad value came from."""

import pytest
import yaml

from creditlab import config
from creditlab.config import Override
from creditlab.errors import ConfigError

TINY = """\
dataset: fake:n=60,classes=3,shape=1x4x4,test=20
model: {arch: 16-8-3, act: tanh, bias: false}
optimizer: {name: adam, lr: 0.01}
epochs: 1
log_every: 0
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("5e-4", 5e-4), ("1E5", 1e5), (".5", 0.5), ("5.", 5.0),
                                        ("+1e-3", 1e-3), ("-2.5E+2", -250.0), ("1.0e-08", 1e-8)])
def test_yaml_numbers_in_exponent_form_are_floats(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(TINY.replace("lr: 0.01", f"lr: {text.lstrip('-')}") + f"published: {{x: {text}}}\n")
    cfg = config.load(path)
    assert cfg["optimizer"]["lr"] == abs(value) and isinstance(cfg["optimizer"]["lr"], float)
    assert cfg["published"]["x"] == value


def test_yaml_integers_follow_yaml_1_2():
    assert yaml.load("[010, 0o10, 0x10, 1_000, 7]", Loader=config.Loader) == [10, 8, 16, 1000, 7]


def test_dump_reads_back_the_same_with_load_and_with_plain_yaml(tiny):
    cfg = config.load(tiny, notes="1e-3", name="yes")
    text = config.dump(cfg)
    assert yaml.safe_load(text) == cfg
    assert config.resolve(yaml.load(text, Loader=config.Loader)) == cfg
    for s in ("1e-3", "010", "yes", "2020-01-01", "0o7"):
        assert yaml.safe_load(config.dump({"x": s}))["x"] == s
        assert yaml.load(config.dump({"x": s}), Loader=config.Loader)["x"] == s


def test_dotted_overrides_set_one_nested_key_and_keep_its_siblings(tiny):
    cfg = config.load(tiny, dotted=["optimizer.lr=1e-3", "model.arch=16-4-3", "epochs=3", "seeds=[0,1]",
                                    "model.bias=true", "algo=ar:steps=10,eta=0.1", "augment.crop_pad=1"])
    assert cfg["optimizer"] == dict(config.DEFAULTS["optimizer"], name="adam", lr=1e-3)
    assert cfg["model"]["arch"] == "16-4-3" and cfg["model"]["act"] == "tanh" and cfg["model"]["bias"] is True
    assert cfg["epochs"] == 3 and cfg["seeds"] == [0, 1] and cfg["algo"] == "ar:steps=10,eta=0.1"
    assert cfg["augment"] == {"crop_pad": 1, "flip": "none"}


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("3", 3), ("false", False), ("null", None), ("", ""),
                                        ("[0, 1]", [0, 1]), ("{a: 1e-3}", {"a": 1e-3}), ("'1e-3'", "1e-3"),
                                        ("784-100-10", "784-100-10"), ("ar:steps=10,eta=0.1", "ar:steps=10,eta=0.1"),
                                        ("a: b", "a: b"), ("2020-01-01", "2020-01-01")])
def test_override_values_are_yaml_scalars_or_flow_else_the_text_as_typed(text, value):
    assert config.parse_override(f"k={text}") == Override("k", value, f"k={text}")


@pytest.mark.parametrize("dotted,msg", [
    (["optimizer.lrr=1"], "optimizer.lrr=1: unknown config key optimizer.'lrr'; valid keys: name, lr,"),
    (["colour=red"], "colour=red: unknown config key 'colour'; valid keys: name, dataset,"),
    (["optimizer.lr=fast"], "optimizer.lr=fast: config key optimizer.lr = 'fast' has type str"),
    (["epochs.x=1"], "epochs.x=1: epochs is 1, not a mapping"),
    (["seeds=0,1"], "a list is written [a, b]"),
    (["epochs"], "'epochs' is not a KEY=VALUE override"),
    (["seeds=[0,"], "seeds=[0,: [0, is not valid YAML"),
    (["epochs=2", "epochs=3"], "epochs is given twice, by epochs=2 and by epochs=3"),
])
def test_a_bad_override_is_one_error_naming_the_override(tiny, dotted, msg):
    with pytest.raises(ConfigError) as e:
        config.load(tiny, dotted=dotted)
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert not str(e.value).startswith(str(tiny))


def test_an_error_names_the_file_for_a_file_value_and_the_flag_for_a_flag_value(tmp_path, tiny):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY + "algo: fq\n")
    with pytest.raises(ConfigError, match=r"^.*bad\.yaml: unknown algorithm 'fq'"):
        config.load(bad)
    with pytest.raises(ConfigError, match=r"^--algo fq: unknown algorithm 'fq'; valid:"):
        config.load(tiny, dotted=[Override("algo", "fq", "--algo fq")])
    # a bad file value fixed on the command line is no error
    assert config.load(bad, dotted=[Override("algo", "bp", "--algo bp")])["algo"] == "bp"


def test_an_override_of_an_mlp_key_under_a_named_model_is_refused(tiny):
    with pytest.raises(ConfigError, match="model.arch=16-4-3: model.arch is not used by the named model 'mnist-fc'"):
        config.load(tiny, dotted=["model.name=mnist-fc", "model.arch=16-4-3"])
    assert config.load(tiny, dotted=["model.name=mnist-fc"])["model"]["name"] == "mnist-fc"


@pytest.mark.parametrize("seeds", [[0, 0], [1, 2, 1]])
def test_duplicate_seeds_are_refused_naming_the_seed(seeds):
    with pytest.raises(ConfigError, match=f"lists seed {seeds[0]} more than once"):
        config.resolve({"seeds": seeds})


@pytest.mark.parametrize("threads", [0, -1])
def test_threads_below_one_are_refused(threads):
    with pytest.raises(ConfigError, match=rf"threads={threads} must be >= 1 .* or null"):
        config.resolve({"threads": threads})
    assert config.resolve({"threads": 1})["threads"] == 1 and config.resolve({"threads": None})["threads"] is None
