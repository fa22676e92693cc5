"""Search as an Optuna study over Bartunov et al.'s Table 4 space (or the config's own),
selecting on the validation split; workers share one storage and survive a killed worker."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from creditlab import config
from creditlab.algorithms import build_algorithm
from creditlab.cli import main
from creditlab.errors import ConfigError
from creditlab.losses import build_loss
from creditlab.models import MLP
from creditlab.spec import parse_spec
from creditlab.search import TABLE4, make_sampler, open_storage, open_study, run_search, search_space, trial_config

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
BASE = {"dataset": "fake:n=256,classes=3,shape=1x4x4", "model": {"arch": "16-8-3", "act": "tanh"},
        "algo": "sdtp", "epochs": 2, "batch_size": 32, "log_every": 0, "threads": 1}


def _study(seed=0, kind="random"):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=make_sampler(kind, seed), direction="maximize")


def test_trials_stay_in_the_table4_space_and_only_suggest_options_the_algorithm_has():
    study = _study()
    for _ in range(50):
        trial = study.ask()
        cfg, drawn = trial_config({"algo": "dtp:schedule=alternating"}, trial)
        assert 1e-5 <= cfg["optimizer"]["lr"] <= 3e-4 and cfg["optimizer"]["betas"][0] == 0.9
        assert cfg["optimizer"]["betas"][1] in (0.99, 0.999) and cfg["optimizer"]["eps"] in (1e-4, 1e-6, 1e-8)
        assert 0.01 <= drawn["alpha"] <= 0.2 and 0.01 <= drawn["sigma"] <= 0.3 and 1e-5 <= drawn["inv_lr"] <= 3e-4
        assert trial.params == drawn and cfg["optimizer"]["name"] == "adam"
        build_algorithm(cfg["algo"], MLP("4-5-5-3", act="tanh"), build_loss("cross_entropy"))  # a valid spec
        assert "schedule=alternating" in cfg["algo"]
        study.tell(trial, 0.0)
    cfg, drawn = trial_config({"algo": "sdtp"}, study.ask())
    assert "alpha" not in drawn and "sigma" in drawn
    trial = study.ask()
    cfg, drawn = trial_config({"algo": "fa"}, trial)
    assert cfg["algo"] == "fa" and set(drawn) == set(trial.params) == {"lr", "beta1", "beta2", "eps"}
    cfg, drawn = trial_config({"algo": "np"}, study.ask())  # np's sigma is not Table 4's inverse noise
    assert set(drawn) == {"lr", "beta1", "beta2", "eps"} and cfg["algo"] == "np"


def test_the_search_space_replaces_values_pinned_in_the_algorithm_spec():
    """A value the spec pins is the config's starting point, not a constraint: a searched key is
    drawn, the rest of the spec stays."""
    study = _study()
    cfg, drawn = trial_config({"algo": "dtp:schedule=alternating,sigma=0.05,alpha=0.5,inv_lr=0.01"}, study.ask())
    name, opts = parse_spec(cfg["algo"])
    assert {"sigma", "alpha", "inv_lr"} <= set(drawn) and opts["schedule"] == "alternating"
    assert opts["sigma"] == drawn["sigma"] != 0.05 and opts["alpha"] == drawn["alpha"] != 0.5
    assert 0.01 <= opts["sigma"] <= 0.3 and 1e-5 <= opts["inv_lr"] <= 3e-4
    own = {"lr": ("choice", [0.1])}  # a declared space without sigma: sigma stays as pinned
    cfg, drawn = trial_config({"algo": "dtp:sigma=0.05"}, _study().ask(), own)
    assert drawn == {"lr": 0.1} and parse_spec(cfg["algo"])[1] == {"sigma": 0.05}
    with pytest.raises(ConfigError, match="inv_eps, alpha, sigma are neither optimizer keys nor options of algorithm fa; valid: lr, "):
        trial_config({"algo": "fa"}, study.ask(), dict(TABLE4))


def test_the_readme_search_example_varies_the_algorithms_own_hyper_parameters(tmp_path, capsys):
    """``creditlab search --config experiments/bartunov-mnist-fc-dtp-parallel.yaml``: the YAML pins
    Table 5's alpha, sigma and inverse Adam, yet the search varies them (Table 4), says so, and
    records it; here on tiny fake data of MNIST's shape, one trial of one epoch."""
    path = ROOT / "experiments" / "bartunov-mnist-fc-dtp-parallel.yaml"
    cfg = config.load(str(path))
    tp_keys = {"alpha", "sigma", "inv_lr", "inv_beta1", "inv_beta2", "inv_eps"}
    assert tp_keys | {"lr", "beta1", "beta2", "eps"} == set(search_space(cfg))
    pinned = parse_spec(cfg["algo"])[1]
    cfg.update(dataset="fake:n=60,classes=10,shape=1x28x28,test=20", epochs=1, log_every=0, threads=1)
    res = run_search(cfg, 1, tmp_path / "s", verbose=True)
    err = capsys.readouterr().err
    assert res["varied"] == sorted(tp_keys | {"lr", "beta1", "beta2", "eps"})
    assert res["replaced_config_values"]["alpha"] == pinned["alpha"] == 0.15008
    trial_opts = parse_spec(res["trials"][0]["algo"])[1]
    assert trial_opts["schedule"] == "parallel"
    assert all(trial_opts[k] == res["trials"][0]["params"][k] for k in tp_keys)
    assert all(trial_opts[k] != pinned[k] for k in ("alpha", "sigma", "inv_lr"))  # continuous: drawn anew
    line = [ln for ln in err.splitlines() if "varies" in ln]
    assert len(line) == 1 and line[0].startswith("creditlab: the search varies alpha, beta1, beta2, eps, inv_beta1")
    assert "(Bartunov et al. Table 4)" in line[0] and "alpha=0.15008" in line[0]


@pytest.mark.parametrize("kind", ["random", "tpe"])
def test_the_same_seed_suggests_the_same_trials(kind):
    def params(seed):
        study = _study(seed, kind)
        study.optimize(lambda t: -abs(trial_config({"algo": "dtp"}, t)[0]["optimizer"]["lr"] - 1e-4), n_trials=12)
        return [t.params for t in study.trials]

    first = params(3)
    assert first == params(3) and first != params(4)
    assert len({p["lr"] for p in first}) == 12


def test_random_values_depend_on_seed_and_trial_number_only():
    """Whichever worker runs trial k, and whatever ran before it, trial k gets the same values."""
    a, b = _study(5), _study(5)
    drawn_a = [trial_config({"algo": "dtp"}, a.ask())[1] for _ in range(3)]
    b.enqueue_trial({"lr": 1e-4})  # trial 0 differs (fixed), trials 1 and 2 must not
    drawn_b = [trial_config({"algo": "dtp"}, b.ask())[1] for _ in range(3)]
    assert drawn_a[0] != drawn_b[0] and drawn_a[1:] == drawn_b[1:]


def test_search_selects_on_validation_and_is_seeded(tmp_path):
    res = run_search(BASE, 3, tmp_path / "a", seed=1)
    scores = [t["summary"]["best_val_accuracy"] for t in res["trials"]]
    assert [t["state"] for t in res["trials"]] == ["COMPLETE"] * 3 and res["finished"] == 3
    assert res["best"]["summary"]["best_val_accuracy"] == max(scores) == res["best"]["score"]
    assert res["selected_on"] == "validation"
    assert res["best_test_at_selected_epoch"] == res["best"]["summary"]["test_accuracy_at_best_val"]
    assert res["best"]["test_accuracy_at_best_val"] == res["best"]["summary"]["test_accuracy_at_best_val"]
    assert json.loads((tmp_path / "a" / "search.json").read_text())["best"]["trial"] == res["best"]["trial"]
    assert (tmp_path / "a" / "search.db").is_file() and (tmp_path / "a" / "trial-00002" / "summary.json").is_file()
    again = run_search(BASE, 1, tmp_path / "b", seed=1)
    assert again["trials"][0]["params"] == res["trials"][0]["params"]
    more = run_search(BASE, 4, tmp_path / "a", seed=1)  # the same storage: the study goes on to 4
    assert [t["params"] for t in more["trials"][:3]] == [t["params"] for t in res["trials"]]
    assert more["finished"] == 4 and len(more["trials"]) == 4
    with pytest.raises(ConfigError, match="trials"):
        run_search(BASE, 0, tmp_path / "c")
    with pytest.raises(ConfigError, match="another config"):
        run_search(dict(BASE, epochs=3), 4, tmp_path / "a", seed=1)
    assert set(TABLE4) >= {"lr", "beta2", "eps", "alpha", "sigma"}


def test_two_local_workers_finish_the_study_with_the_serial_trials(tmp_path):
    serial = run_search(BASE, 3, tmp_path / "serial", seed=2)
    parallel = run_search(BASE, 3, tmp_path / "parallel", seed=2, workers=2)
    done = [t for t in parallel["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 3 and parallel["finished"] == 3
    key = lambda t: t["trial"]  # noqa: E731
    assert [t["params"] for t in sorted(done, key=key)] == [t["params"] for t in serial["trials"]]
    assert [t["score"] for t in sorted(done, key=key)] == [t["score"] for t in serial["trials"]]  # threads: 1 both


def test_a_declared_space_and_sampler_are_validated_and_used(tmp_path):
    space = {"lr": ["loguniform", 1.0e-3, 1.0e-2], "momentum": ["choice", [0.0, 0.9]]}
    cfg = config.resolve(dict(BASE, algo="bp", search={"space": space, "sampler": "tpe"}))
    assert cfg["search"] == {"space": space, "sampler": "tpe"}
    assert config.resolve(yaml.safe_load(config.dump(cfg))) == cfg  # dump round-trips
    res = run_search(cfg, 2, tmp_path / "s", seed=0)
    assert res["sampler"] == "tpe"
    for t in res["trials"]:
        assert set(t["params"]) == {"lr", "momentum"} and 1e-3 <= t["params"]["lr"] <= 1e-2
        assert t["algo"] == "bp"
    for bad, msg in [({"space": {"alpha": ["uniform", 0.1, 0.2]}}, "neither an optimizer key nor an option of algorithm bp"),
                     ({"space": {"lr": ["loguniform", "1e-5", 1.0e-3]}}, "loguniform needs two numbers LO < HI"),
                     ({"space": {"lr": ["normal", 0, 1]}}, "write \\[loguniform"),
                     ({"space": {"lr": ["uniform", 2.0, 1.0]}}, "LO < HI"),
                     ({"sampler": "grid"}, "search.sampler='grid'"),
                     ({"spaces": {}}, "unknown config key search.'spaces'")]:
        with pytest.raises(ConfigError, match=msg):
            config.resolve(dict(BASE, algo="bp", search=bad))


def test_diverged_trials_are_pruned_not_fatal_and_exit_3(tmp_path, capsys):
    cfg = {"dataset": "fake:n=200,shape=1x6x6", "model": {"arch": "36-12-10", "act": "tanh"}, "loss": "mse",
           "algo": "bp", "optimizer": {"name": "sgd", "lr": 1.0}, "epochs": 1, "batch_size": 50, "log_every": 0,
           "threads": 1, "search": {"space": {"lr": ["uniform", 1.0e6, 2.0e6]}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["search", "--config", str(tmp_path / "c.yaml"), "--trials", "2", "--out", str(tmp_path / "s"), "--quiet"])
    assert code == 3 and "no trial completed (2 diverged)" in capsys.readouterr().err
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert [t["state"] for t in saved["trials"]] == ["PRUNED", "PRUNED"] and saved["best"] is None
    assert all("divergence" in t["diverged"] for t in saved["trials"])


def test_a_killed_workers_replaced_trial_leaves_a_complete_study_exit_0_and_one_line(tmp_path, capsys):
    """SIGKILL a worker mid-trial: the next worker marks that trial FAIL (its heartbeat stopped)
    and still brings the study to the requested number of finished trials."""
    cfg = dict(BASE, name="kill", algo="dtp", dataset="fake:n=1200,classes=3,shape=1x4x4", epochs=10)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "s"
    args = ["search", "--config", str(tmp_path / "c.yaml"), "--trials", "2", "--out", str(out), "--heartbeat", "1",
            "--quiet"]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = subprocess.Popen([sys.executable, "-m", "creditlab", *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"sqlite:///{out / 'search.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    running, deadline = [], time.monotonic() + 300
    try:
        while not running:
            assert worker.poll() is None, "the worker ended before a trial was seen running"
            assert time.monotonic() < deadline, "no trial started within 300 s"
            time.sleep(0.05)
            try:
                running = optuna.load_study(study_name="kill", storage=url).get_trials(
                    states=(optuna.trial.TrialState.RUNNING,))
            except Exception:  # noqa: BLE001  (the study is not created yet)
                continue
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    killed = running[0].number
    capsys.readouterr()
    assert main(args) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"creditlab: a worker died during trial {killed}; its trial was marked failed and replaced "
                   "(2 of 2 trials finished)"]
    study = optuna.load_study(study_name="kill", storage=url)
    states = {t.number: t.state for t in study.trials}
    assert states[killed] == optuna.trial.TrialState.FAIL
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) == 2
    assert study.best_trial.number != killed
    saved = json.loads((out / "search.json").read_text())
    assert saved["finished"] == 2 and saved["best"]["trial"] == study.best_trial.number
    assert saved["worker_died"] == [killed]


def test_a_local_worker_killed_mid_trial_is_replaced_and_the_search_still_succeeds(tmp_path, capsys):
    """--workers 2, one of them SIGKILLed while both run a trial: the other replaces the trial and
    the search returns normally, with one line saying so (not a 'worker failed' error)."""
    import multiprocessing
    import threading

    cfg = dict(BASE, name="kill2", algo="dtp", dataset="fake:n=1200,classes=3,shape=1x4x4", epochs=10)
    out = tmp_path / "s"
    killed: list[int] = []

    def running_trials() -> int:
        """RUNNING trials, read with sqlite3 in read-only mode: this thread must neither create the
        storage's schema (racing the search's own creation of it) nor import SQLAlchemy while the
        main thread is importing it."""
        import sqlite3

        try:
            with sqlite3.connect(f"file:{out / 'search.db'}?mode=ro", uri=True, timeout=1) as db:
                return db.execute("SELECT count(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0]
        except sqlite3.Error:  # not created yet, or locked for a moment
            return 0

    def kill_one_when_both_run():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            time.sleep(0.1)
            children = multiprocessing.active_children()
            if running_trials() == 2 and len(children) == 2:
                os.kill(children[0].pid, signal.SIGKILL)
                killed.append(children[0].pid)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    killer = threading.Thread(target=kill_one_when_both_run, daemon=True)
    killer.start()
    res = run_search(cfg, 2, out, workers=2, heartbeat=1, verbose=False)
    killer.join()
    assert killed, "no moment with both workers in a trial"
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("creditlab:")]
    assert len(res["worker_died"]) == 1 and res["finished"] == 2
    assert err == [f"creditlab: a worker died during trial {res['worker_died'][0]}; its trial was marked failed "
                   "and replaced (2 of 2 trials finished)"]


def test_a_trial_left_without_any_heartbeat_is_failed_and_replaced(tmp_path):
    """A worker killed between creating its trial and the trial's first heartbeat leaves a RUNNING
    trial Optuna's own stale check never fails; the next worker fails it after the grace period
    instead of waiting for it forever."""
    cfg = dict(BASE, name="nohb", epochs=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "s"
    args = ["search", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--heartbeat", "1", "--quiet"]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def search(trials):  # in a subprocess: without the fix this would wait forever
        r = subprocess.run([sys.executable, "-m", "creditlab", *args, "--trials", str(trials)], env=env,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]

    search(1)
    url = f"sqlite:///{out / 'search.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    orphan = optuna.load_study(study_name="nohb", storage=url).ask().number  # RUNNING, no heartbeat thread
    search(2)
    states = {t.number: t.state for t in optuna.load_study(study_name="nohb", storage=url).trials}
    assert states[orphan] == optuna.trial.TrialState.FAIL
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) == 2


def test_a_storage_url_whose_driver_is_missing_names_the_package_and_fails_fast(tmp_path, monkeypatch):
    for module in ("psycopg", "psycopg2", "pymysql", "MySQLdb"):  # not installed, whatever this machine has
        monkeypatch.setitem(sys.modules, module, None)
    for url, package in [("postgresql+psycopg2://u:secret@10.255.255.1/db", "pip install psycopg2-binary"),
                         ("postgresql://u:secret@10.255.255.1/db", "pip install "),  # psycopg2 or psycopg[binary]
                         ("mysql+pymysql://u:secret@10.255.255.1/db", "pip install PyMySQL"),
                         ("mysql://u:secret@10.255.255.1/db", "pip install mysqlclient (or write mysql+pymysql")]:
        start = time.monotonic()
        with pytest.raises(ConfigError) as e:
            run_search(BASE, 1, tmp_path / "s", storage=url)
        msg = str(e.value)
        assert time.monotonic() - start < 10 and "\n" not in msg
        assert package in msg and "needs the database driver" in msg and "secret" not in msg
        assert "psycopg" in msg if url.startswith("postgresql") else "mysql" in msg.lower()
    with pytest.raises(ConfigError, match="unknown kind of database 'nosuchdb'"):
        run_search(BASE, 1, tmp_path / "s", storage="nosuchdb://h/db")


def test_joining_a_study_made_for_another_config_names_the_differing_keys(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = config.resolve(dict(BASE, optimizer={"lr": 0.01}))
    open_study(first, storage, "s", make_sampler("random", 0))
    open_study(dict(first, device="cpu", threads=2), storage, "s", make_sampler("random", 0))  # may differ
    other = config.resolve(dict(BASE, optimizer={"lr": 0.001}, epochs=3))
    with pytest.raises(ConfigError) as e:
        open_study(other, storage, "s", make_sampler("random", 0))
    msg = str(e.value)
    assert "created for another config: epochs: 2 (study) vs 3 (this config); " \
           "optimizer.lr: 0.01 (study) vs 0.001 (this config); use another --study" in msg


def test_a_storage_whose_schema_another_worker_is_creating_is_opened_as_it_is(tmp_path, monkeypatch):
    """Workers started at the same moment on a fresh database race to create its tables; the one
    that loses (an integrity error on the schema's version row) opens the storage the winner made."""
    import sqlalchemy.exc

    from creditlab import search

    real, calls = optuna.storages.RDBStorage, []

    def racing(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            real(*a, **k)  # the other worker's creation, finished while ours failed
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
        return real(*a, **k)

    monkeypatch.setattr(search.optuna.storages, "RDBStorage", racing)
    storage = search.open_storage(f"sqlite:///{tmp_path / 'fresh.db'}", heartbeat=1)
    assert isinstance(storage, real) and len(calls) == 2

