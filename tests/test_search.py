"""Random search over Bartunov et al.'s Table 4 space, selecting on the validation split."""

import json
import random

import pytest

from creditlab.algorithms import build_algorithm
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import MLP
from creditlab.search import TABLE4, run_search, sample_trial




def test_trials_stay_in_the_table4_space_and_only_set_options_the_algorithm_has():
    rng = random.Random(0)
    for _ in range(50):
        cfg, drawn = sample_trial({"algo": "dtp:schedule=alternating"}, rng)
        assert 1e-5 <= cfg["optimizer"]["lr"] <= 3e-4 and cfg["optimizer"]["betas"][0] == 0.9
        assert cfg["optimizer"]["betas"][1] in (0.99, 0.999) and cfg["optimizer"]["eps"] in (1e-4, 1e-6, 1e-8)
        assert 0.01 <= drawn["alpha"] <= 0.2 and 0.01 <= drawn["sigma"] <= 0.3 and 1e-5 <= drawn["inv_lr"] <= 3e-4
        build_algorithm(cfg["algo"], MLP("4-5-5-3", act="tanh"), build_loss("cross_entropy"))  # a valid spec
        assert "schedule=alternating" in cfg["algo"]
    cfg, drawn = sample_trial({"algo": "sdtp"}, rng)
    assert "alpha" not in drawn and "sigma" in drawn
    cfg, drawn = sample_trial({"algo": "fa"}, rng)
    assert cfg["algo"] == "fa" and set(drawn) == {"lr", "beta1", "beta2", "eps"}


def test_search_selects_on_validation_and_is_seeded(tmp_path):
    base = {"dataset": "fake:n=256,classes=3,shape=1x4x4", "model": {"arch": "16-8-3", "act": "tanh"},
            "algo": "sdtp", "epochs": 2, "batch_size": 32, "log_every": 0, "threads": 1}
    res = run_search(base, 3, tmp_path / "a", seed=1)
    scores = [t["summary"]["best_val_accuracy"] for t in res["trials"]]
    assert res["best"]["summary"]["best_val_accuracy"] == max(scores) and res["selected_on"] == "validation"
    assert res["best_test_at_selected_epoch"] == res["best"]["summary"]["test_accuracy_at_best_val"]
    assert json.loads((tmp_path / "a" / "search.json").read_text())["best"]["trial"] == res["best"]["trial"]
    again = run_search(base, 1, tmp_path / "b", seed=1)
    assert again["trials"][0]["params"] == res["trials"][0]["params"]
    with pytest.raises(ConfigError, match="trials"):
        run_search(base, 0, tmp_path / "c")
    assert set(TABLE4) >= {"lr", "beta2", "eps", "alpha", "sigma"}
