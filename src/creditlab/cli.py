"""The ``creditlab`` command line: train, compare, collect, check, relax, bench, search, list.

train, compare and search take the config's keys as ``KEY=VALUE`` arguments (dotted for nested
keys: ``optimizer.lr=1e-3 model.arch=784-100-10 epochs=3``), validated by the same schema;
their flags (``--epochs``, ``--algo``, ...) are short forms of some of these keys.

Errors a user can fix (bad config, missing or corrupted data, divergence) are printed as one
message without a traceback; exit codes: 2 bad input, 3 divergence, 4 a collected comparison
with missing or unfinished runs, 130 interrupted (Ctrl-C), 143 stopped by SIGTERM."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from creditlab import __version__
from creditlab import config as config_mod
from creditlab.config import Override
from creditlab.errors import ConfigError, CreditlabError


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in _split_specs(text) if s.strip()]


def _split_specs(text: str) -> list[str]:
    """Split ``bp,ar:steps=10,eta=0.1,fa`` into specs: a comma starts a new spec unless what
    follows looks like ``key=value`` (an option of the previous spec)."""
    parts, out = text.split(","), []
    for part in parts:
        if out and "=" in part.split(":")[0] and ":" in out[-1]:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def _ints(text: str | None, flag: str = "--seeds") -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text}: give comma-separated integers, e.g. {flag} 0,1,2") from None


def _floats(text: str, flag: str, example: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{flag} {text}: give comma-separated positive numbers, e.g. {flag} {example}")
    return values


def _shape(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(s) for s in text.lower().split("x"))


#: flags that are short forms of config keys: argparse dest -> (config key, flag)
_FLAG_KEYS = {"dataset": ("dataset", "--dataset"), "epochs": ("epochs", "--epochs"),
              "data_dir": ("data_dir", "--data-dir"), "device": ("device", "--device"),
              "threads": ("threads", "--threads"), "algo": ("algo", "--algo"), "config_seed": ("seed", "--seed")}


def _overrides(args) -> list[Override]:
    """The command line's config values, labelled as typed: the flags first, then the
    ``KEY=VALUE`` arguments (a key given by both, with different values, is refused)."""
    out = [Override(key, v, f"{flag} {v}") for dest, (key, flag) in _FLAG_KEYS.items()
           if (v := getattr(args, dest, None)) is not None]
    if getattr(args, "algos", None) is not None:
        out.append(Override("algos", _csv(args.algos), f"--algos {args.algos}"))
    if getattr(args, "seeds", None) is not None:
        out.append(Override("seeds", _ints(args.seeds), f"--seeds {args.seeds}"))
    if getattr(args, "deterministic", False):
        out.append(Override("deterministic", True, "--deterministic"))
    model, arch = getattr(args, "model", None), getattr(args, "arch", None)
    if model is not None and arch is not None:
        raise ConfigError(f"--model {model} --arch {arch}: give one (--model names a model, --arch builds an MLP "
                          "from a layer spec)")
    if model is not None:
        out.append(Override("model.name", model, f"--model {model}"))
    if arch is not None:
        out += [Override("model.arch", arch, f"--arch {arch}"), Override("model.name", None, f"--arch {arch}")]
    return out + [config_mod.parse_override(t) for t in getattr(args, "overrides", None) or []]


def _one_algo(raw: dict | None, origin: str | None, over: list[Override]) -> tuple[list[Override], str | None]:
    """A config file that lists ``algos:`` but no ``algo:``, for a command that runs one
    algorithm: its only entry (and a note saying so), or an error asking for ``--algo``."""
    algos = (raw or {}).get("algos")
    if "algo" in (raw or {}) or not isinstance(algos, list) or not algos or any(o.key == "algo" for o in over):
        return over, None
    if len(algos) == 1:
        return over + [Override("algo", algos[0], f"{origin} (algos:)")], \
            f"the config lists one algorithm (algos:), training it: {algos[0]}"
    raise ConfigError(f"{origin} lists {len(algos)} algorithms under algos: ({'; '.join(map(str, algos))}) and no "
                      f"algo:, and this command runs one: choose it with --algo, e.g. --algo {shlex.quote(str(algos[0]))}")


def _load_cfg(args, base: dict | None = None, one_algo: bool = False) -> tuple[dict, list[Override], str | None]:
    """The resolved config of ``--config`` (else ``base``, else the defaults) with the command
    line's values; also the overrides (to tell what was given explicitly) and a note to print."""
    over = _overrides(args)
    raw, origin = (config_mod.read(args.config), args.config) if args.config else (base, None)
    note = None
    if one_algo:
        over, note = _one_algo(raw, origin, over)
    return config_mod.resolve(raw, over, origin=origin), over, note


def _stored(out: Path) -> dict | None:
    """A run directory's resolved config (``--resume`` without ``--config``), if it has one."""
    path = out / "config.yaml"
    return config_mod.read(path) if path.is_file() else None


def _explicit(over: list[Override], key: str) -> bool:
    return any(o.key == key for o in over)


def _default_run_dir(cfg: dict) -> Path:
    return Path("runs") / f"{cfg['name']}-{cfg['algo'].replace(':', '_').replace(',', '_')}-s{cfg['seed']}"


def launch_nproc(nproc: int, argv: list[str]) -> int:
    """``creditlab train --nproc N``: the same command under ``torchrun --standalone`` with N
    processes on this machine (``--nproc`` removed); returns torchrun's exit code."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "creditlab", *rest]
    print("launching: " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd).returncode


def _refuse_both(args) -> None:
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite: give one (--resume continues the run in --out, --overwrite "
                          "removes it and starts again)")


def cmd_train(args) -> int:
    from creditlab.devices import resolve_device
    from creditlab.distributed import in_launch
    from creditlab.train import train

    _refuse_both(args)
    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc {args.nproc}: give a number of processes >= 1")
        if in_launch():
            raise ConfigError("--nproc inside a torchrun launch: drop --nproc (torchrun already started the processes)")
    if args.resume and not args.config:
        # continue the run in --out: its own stored config, then the command line's values
        over = _overrides(args)
        out = Path(args.out) if args.out else _default_run_dir(config_mod.resolve(None, over))
        stored = _stored(out)
        origin = str(out / "config.yaml") if stored is not None else None
        cfg, note = config_mod.resolve(stored, over, origin=origin), None
    else:
        cfg, over, note = _load_cfg(args, one_algo=True)
        out = Path(args.out) if args.out else _default_run_dir(cfg)
    try:
        resolve_device(cfg["device"])  # before anything starts: with --nproc, one error, not one per process
    except ConfigError as e:
        where = next((o.label for o in reversed(over) if o.key == "device"), args.config)
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    if args.nproc is not None and args.nproc > 1:
        return launch_nproc(args.nproc, args.argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        if note:
            print(note, flush=True)
        print(f"training {cfg['algo']} on {cfg['dataset']} -> {out}", flush=True)
    summary = train(cfg, out, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite,
                    extend=bool(args.resume and _explicit(over, "epochs")))
    if rank0:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_compare(args) -> int:
    from creditlab.compare import COMMANDS, QUICKSTART, compare, plan

    _refuse_both(args)
    base: dict | None = QUICKSTART
    if args.resume and not args.config and args.out:
        base = _stored(Path(args.out)) or QUICKSTART  # continue the comparison with its stored config
    cfg, over, _ = _load_cfg(args, base=base)
    if args.plan:
        for flag, given in (("--out", args.out), ("--jobs", args.jobs != 1), ("--resume", args.resume),
                            ("--overwrite", args.overwrite)):
            if given:
                raise ConfigError(f"compare --plan DIR writes the runs' command lines into DIR instead of running "
                                  f"them; drop {flag}")
        runs = plan(cfg, args.plan)
        commands = Path(args.plan).resolve() / COMMANDS
        print(f"planned {len(runs)} runs; one creditlab train command per line in {commands}")
        print(f"SLURM job array:  sbatch --array=1-{len(runs)} --wrap 'sed -n \"${{SLURM_ARRAY_TASK_ID}}p\" {commands} | bash'")
        print(f"then:             creditlab collect {Path(args.plan).resolve()}")
        return 0
    out = Path(args.out or Path("runs") / cfg["name"])
    summary = compare(cfg, out, progress=not args.quiet, resume=args.resume, jobs=args.jobs,
                      overwrite=args.overwrite, extend=bool(args.resume and _explicit(over, "epochs")))
    print((out / "summary.md").read_text())
    print(f"run directory: {out}")
    if summary["diverged"]:
        print(f"creditlab: {len(summary['diverged'])} run(s) diverged; see summary.json", file=sys.stderr)
        return 3
    return 0


def rerun_line(commands: Path, line: int, extra: str = "") -> str:
    """A bash line that reruns line ``line`` of ``commands`` with ``extra`` flags appended."""
    if not extra:
        return f"sed -n {line}p {shlex.quote(str(commands))} | bash"
    escaped = extra.replace("\\", "\\\\").replace("&", "\\&").replace("/", "\\/")
    return f"sed -n {shlex.quote(f'{line}s/$/ {escaped}/p')} {shlex.quote(str(commands))} | bash"


def cmd_collect(args) -> int:
    from creditlab.compare import COMMANDS, collect

    summary = collect(args.dir)
    print((Path(args.dir) / "summary.md").read_text())
    commands = Path(args.dir) / COMMANDS
    for o in summary.get("incomplete", []):
        print(f"creditlab: {o['status']}: {o['algo']} seed {o['seed']} in {o['dir']} ({o['message']}); "
              f"rerun: {rerun_line(commands, o['line'], o.get('rerun', ''))}", file=sys.stderr)
    for d in summary["diverged"]:
        print(f"creditlab: diverged: {d['algo']} seed {d['seed']}: {d['message']} To run it again after changing "
              f"its config.yaml: {rerun_line(commands, d['line'], d['rerun'])}", file=sys.stderr)
    if summary.get("incomplete"):
        print(f"creditlab: {len(summary['incomplete'])} run(s) missing or unfinished; run their rerun lines above "
              f"(lines of {commands}), then collect again", file=sys.stderr)
        return 4
    return 3 if summary["diverged"] else 0


def cmd_check(args) -> int:
    from creditlab.check import run_check

    res = run_check(args.algo, arch=args.arch, model=args.model, act=args.act, out_act=args.out_act,
                    bias=not args.no_bias, init=args.init, batch=args.batch, dtype=args.dtype, loss=args.loss,
                    seed=args.seed, device=args.device or "cpu", in_shape=_shape(args.in_shape),
                    classes=args.classes, dataset=args.dataset)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['algo']} vs autograd ({res['dtype']}, batch {res['batch']}, {res['loss']})")
        for r in res["layers"]:
            print(f"  {r['name']:<24} angle {r['angle_deg']:10.6f} deg   rel. error {r['rel_error']:.3e}")
        print(f"  mean angle {res['mean_angle_deg']:.6f} deg")
    return 0


def cmd_relax(args) -> int:
    import torch

    from creditlab.devices import resolve_device
    from creditlab.diagnostics.relaxation import relaxation_traces
    from creditlab.losses import build_loss
    from creditlab.models import MLP, parse_arch
    from creditlab.plots import plot_relaxation

    etas = _floats(args.etas, "--etas", "0.5,0.2,0.1,0.05")
    torch.manual_seed(args.seed)
    sizes = parse_arch(args.arch)
    dev = resolve_device(args.device or "cpu")
    model = MLP(sizes, args.act, "linear", bias=False, init=args.init).to(device=dev, dtype=torch.float64)
    if args.dataset:
        from creditlab.data import load_dataset

        d = load_dataset(args.dataset)
        x, y = d.x_train[: args.batch].to(device=dev, dtype=torch.float64), d.y_train[: args.batch].to(dev)
    else:
        x = torch.rand(args.batch, sizes[0], dtype=torch.float64).to(dev)  # drawn on the CPU: the same batch on every device
        y = torch.randint(0, sizes[-1], (args.batch,)).to(dev)
    res = relaxation_traces(model, build_loss(args.loss), x, y, etas, args.steps, args.schedule, args.init_state)
    res["arch"] = args.arch
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "relax.json").write_text(json.dumps(res))
        ref = str(0.1 if 0.1 in etas else etas[0])
        layers = res["layers"][ref]
        plot_relaxation(out / "relax_layers.png", {f"x^{l + 1}": [row[l] for row in layers] for l in range(len(layers[0]))},
                        f"eta = {ref} ({args.schedule})")
        plot_relaxation(out / "relax_etas.png", {f"eta = {e}": res["mean"][e] for e in res["mean"]}, "mean over layers")
    if args.json:
        print(json.dumps(res))
    else:
        for e, tr in res["mean"].items():
            print(f"eta {e:>6}: MSE to backprop gradient at t=0 {tr[0]:.3e}, t={len(tr) - 1} {tr[-1]:.3e}")
        if args.out:
            print(f"written: {args.out}/relax.json, relax_layers.png, relax_etas.png")
    return 0


def cmd_bench(args) -> int:
    from creditlab.bench import run_bench

    algos = _csv(args.algos) or ["bp", "ar", "ar:mode=simulate,steps=100"]
    arch = None if args.model else args.arch
    res = run_bench(algos, arch=arch, model=args.model, act=args.act, out_act=args.out_act, bias=args.bias,
                    init=args.init, batch=args.batch, loss=args.loss, dtype=args.dtype, device=args.device or "cpu",
                    repeats=args.repeats, warmup=args.warmup, in_shape=_shape(args.in_shape), classes=args.classes)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"one training step, median of {res['repeats']} ({res['device']}, {res['threads']} threads, "
              f"{res['dtype']}, batch {res['batch']})")
        for r in res["results"]:
            print(f"  {r['algo']:<44} {r['ms_per_step']:9.3f} ms   {r['ratio_vs_bp']:6.2f}x bp")
    return 0


def cmd_search(args) -> int:
    from creditlab.search import run_search

    cfg, _, note = _load_cfg(args, one_algo=True)
    if note:
        print(note.replace("training it", "searching it"), flush=True)
    out = Path(args.out or Path("runs") / f"{cfg['name']}-search")
    res = run_search(cfg, args.trials, out, seed=args.seed, progress=not args.quiet, storage=args.storage,
                     study=args.study, workers=args.workers, sampler=args.sampler, heartbeat=args.heartbeat,
                     verbose=not args.quiet)
    print(json.dumps({k: res.get(k) for k in ("best", "best_test_at_selected_epoch", "best_test_over_training",
                                              "finished", "diverged")}
                     | {"search": str(out / "search.json")}, indent=2, default=str))
    if res["best"] is None:
        print(f"creditlab: no trial completed ({res['diverged']} diverged); see {out / 'search.json'}", file=sys.stderr)
        return 3
    return 0


#: what ``creditlab list`` says about each dataset (the names come from creditlab.data.DATASETS)
_DATASET_NOTES = {
    "mnist": "MNIST, 60,000 train (last 10,000 validation) + 10,000 test, 1x28x28, 10 classes",
    "fashion-mnist": "Fashion-MNIST, as MNIST",
    "cifar10": "CIFAR-10, 50,000 train (last 5,000 validation) + 10,000 test, 3x32x32, 10 classes",
    "cifar100": "CIFAR-100 (fine labels), as CIFAR-10 with 100 classes",
    "mnist-mini": "the bundled MNIST subset: 8,000 train + 2,000 validation + 2,000 test (no download)",
    "fake": "synthetic; options n, classes, shape, seed, test, e.g. fake:n=60,classes=3,shape=1x4x4,test=20",
}


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return "none" if v is None else str(v)


def cmd_list(args) -> int:
    import textwrap

    from creditlab.algorithms import algorithm_class, algorithm_names
    from creditlab.data import DATASETS
    from creditlab.models import model_names

    algos = {n: dict(algorithm_class(n).defaults) for n in algorithm_names()}
    models = model_names()
    if args.json:
        print(json.dumps({"algorithms": {n: {"options": o} for n, o in algos.items()}, "models": models,
                          "datasets": {d: _DATASET_NOTES.get(d, "") for d in DATASETS}}, indent=2, default=str))
        return 0
    print("algorithms (--algo NAME or NAME:key=value,...; each option with its default):")
    for name, opts in algos.items():
        text = " ".join(f"{k}={_fmt_value(v)}" for k, v in opts.items()) or "(no options)"
        print(textwrap.fill(text, width=100, initial_indent=f"  {name:<8} ", subsequent_indent=" " * 11))
    print("\nmodels (--model NAME, or --model package.module:factory for your own):")
    width = max(map(len, models), default=0)
    for name, what in models.items():
        print(f"  {name:<{width}}  {what}".rstrip())
    print("\ndatasets (--dataset NAME):")
    for d in DATASETS:
        print(f"  {d:<13} {_DATASET_NOTES.get(d, '')}".rstrip())
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``creditlab: train: argument --epochs: ...``)
    raised as :class:`ConfigError` (exit 2), not a usage block."""

    def error(self, message: str):  # type: ignore[override]
        where = self.prog.removeprefix("creditlab").strip()
        raise ConfigError(f"{where + ': ' if where else ''}{message} (see {self.prog} --help)")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="creditlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"creditlab {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="one of the commands below; creditlab COMMAND --help for its options")

    def common(sp, what: str, resume_help: str):
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config keys, dotted for nested ones, e.g. optimizer.lr=1e-3 model.arch=784-100-10 "
                             "epochs=3 seeds=[0,1]; values are read as YAML; applied after --config and the flags")
        sp.add_argument("--config", help="YAML experiment file (schema in src/creditlab/config.py)")
        sp.add_argument("--out", help=f"the {what} directory")
        sp.add_argument("--epochs", type=int, help="epochs (config key epochs); with --resume, a larger number "
                                                   "than the run's extends it")
        sp.add_argument("--dataset", help="dataset (config key dataset), e.g. mnist, cifar10, mnist-mini, "
                                          "fake:n=600; see creditlab list")
        sp.add_argument("--data-dir", help="folder with the dataset files (before $CREDITLAB_DATA and the cache)")
        sp.add_argument("--device", help="cpu, cuda, cuda:N or auto (config key device)")
        sp.add_argument("--threads", type=int, help="torch threads per run, >= 1 (config key threads)")
        sp.add_argument("--model", help="built-in model name (see creditlab list) or package.module:factory "
                                        "(config key model.name)")
        sp.add_argument("--arch", help="MLP layer spec, e.g. 784-300-300-100-10 (config key model.arch; "
                                       "clears model.name)")
        sp.add_argument("--resume", action="store_true", help=resume_help)
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--deterministic", action="store_true",
                        help="torch's deterministic algorithms (config key deterministic)")

    overwrite_help = "replace an existing run in --out (removes it first)"
    t = sub.add_parser("train", help="train one algorithm and seed")
    common(t, "run", "continue the run in --out from its checkpoint (without --config: with the run's stored "
                     "config.yaml)")
    t.add_argument("--algo", help="algorithm spec (config key algo), e.g. ar:steps=100,eta=0.1; see creditlab list")
    t.add_argument("--seed", type=int, dest="config_seed", metavar="SEED", help="seed of the run (config key seed)")
    t.add_argument("--nproc", type=int, help="data-parallel processes on this machine (runs torchrun --standalone)")
    t.add_argument("--overwrite", action="store_true", help=overwrite_help)
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("compare", help="every algorithm x seed on identical batches (default: the quick start)")
    common(c, "comparison", "continue the comparison in --out: finished runs are kept, unfinished ones resumed "
                            "(without --config: with its stored config.yaml)")
    c.add_argument("--algos", help="comma-separated specs (config key algos), e.g. bp,ar,ar:feedback=learned,derivative=false")
    c.add_argument("--seeds", help="comma-separated seeds (config key seeds), e.g. 0,1,2")
    c.add_argument("--jobs", type=int, default=1,
                   help="parallel local processes (threads each: the config's, else cores // jobs); same numbers as serial")
    c.add_argument("--plan", metavar="DIR", help="write each run's config and one command line per run into "
                                                 "DIR/commands.txt (for a job array) instead of running; then collect DIR")
    c.add_argument("--overwrite", action="store_true", help=overwrite_help)
    c.set_defaults(fn=cmd_compare)

    g = sub.add_parser("collect", help="summarise a planned comparison (compare --plan DIR) from its finished runs")
    g.add_argument("dir", help="the plan directory")
    g.set_defaults(fn=cmd_collect)

    def model_args(sp, arch_default=None, init="xavier"):
        sp.add_argument("--arch", default=arch_default, help="MLP layer spec, e.g. 784-300-300-100-10")
        sp.add_argument("--model", help="built-in model name (see creditlab list) or package.module:factory")
        sp.add_argument("--act", default="relu", help="hidden activation of the MLP (default relu)")
        sp.add_argument("--out-act", default="linear", help="output activation of the MLP (default linear)")
        sp.add_argument("--init", default=init, help=f"weight init: normal(STD), xavier, xavier_normal, orthogonal "
                                                     f"or default (default {init})")
        sp.add_argument("--batch", type=_int_at_least(1), default=64, help="batch size (default 64)")
        sp.add_argument("--dtype", default="float32", help="float32 or float64 (default float32)")
        sp.add_argument("--loss", default="mse", help="loss spec: mse or cross_entropy (default mse)")
        sp.add_argument("--device", help="cpu, cuda, cuda:N or auto (default cpu)")
        sp.add_argument("--in-shape", help="input shape for --model, e.g. 1x28x28 or 3x32x32")
        sp.add_argument("--classes", type=_int_at_least(1), default=10, help="output classes (default 10)")
        sp.add_argument("--json", action="store_true", help="print the result as JSON")

    k = sub.add_parser("check", help="one batch: per-layer angle and error of an algorithm's updates vs autograd")
    model_args(k)
    k.add_argument("--algo", required=True, help="algorithm spec, e.g. ar:steps=inf")
    k.add_argument("--seed", type=int, default=0, help="seed of the model and the batch (default 0)")
    k.add_argument("--no-bias", action="store_true", help="an MLP without biases")
    k.add_argument("--dataset", help="take the batch from this dataset instead of random inputs")
    k.set_defaults(fn=cmd_check)

    r = sub.add_parser("relax", help="AR convergence trace to the backprop gradient (paper Fig. 1)")
    r.add_argument("--arch", default="784-300-300-100-10", help="MLP layer spec (default 784-300-300-100-10)")
    r.add_argument("--act", default="relu", help="hidden activation (default relu)")
    r.add_argument("--init", default="normal(0.05)", help="weight init (default normal(0.05))")
    r.add_argument("--etas", default="0.5,0.2,0.1,0.05",
                   help="comma-separated positive relaxation step sizes (default 0.5,0.2,0.1,0.05)")
    r.add_argument("--steps", type=_int_at_least(1), default=200, help="relaxation steps (default 200)")
    r.add_argument("--schedule", default="synchronous", choices=["synchronous", "sweep"],
                   help="update all layers at once, or sweep from the output down (default synchronous)")
    r.add_argument("--init-state", default="forward", choices=["forward", "zero"],
                   help="start the relaxation from the forward pass or from zero (default forward)")
    r.add_argument("--loss", default="mse", help="loss spec (default mse)")
    r.add_argument("--batch", type=_int_at_least(1), default=64, help="batch size (default 64)")
    r.add_argument("--seed", type=int, default=0, help="seed of the model and the batch (default 0)")
    r.add_argument("--dataset", help="take the batch from this dataset (e.g. mnist-mini)")
    r.add_argument("--out", help="write relax.json and the plots into this directory")
    r.add_argument("--device", help="cpu, cuda, cuda:N or auto (default cpu)")
    r.add_argument("--json", action="store_true", help="print the traces as JSON")
    r.set_defaults(fn=cmd_relax)

    s = sub.add_parser("search", help="Optuna study over the config's space (default: Bartunov et al. Table 4), "
                                      "selected on the validation split")
    common(s, "search", "no effect, kept for scripts: a search always continues the study in its storage "
                        "(run the same command again)")
    s.add_argument("--algo", help="algorithm spec (config key algo) whose hyper-parameters are searched")
    s.add_argument("--trials", type=int, default=60,
                   help="finished trials of the study in total, over all workers (the Bartunov et al. search used 60)")
    s.add_argument("--seed", type=int, default=0, help="seed of the search's sampler")
    s.add_argument("--sampler", choices=["random", "tpe"], help="default: the config's search.sampler, else random")
    s.add_argument("--storage", help="Optuna RDB URL shared by the workers (default sqlite:///OUT/search.db), "
                                     "e.g. postgresql://user:password@host/db")
    s.add_argument("--study", help="study name (default: the config's name); workers with the same storage and "
                                   "study join one search")
    s.add_argument("--workers", type=int, default=1, help="local worker processes joining the study")
    s.add_argument("--heartbeat", type=_int_at_least(1), default=60,
                   help="seconds between worker heartbeats; a killed worker's trial is marked failed after 2x this")
    s.set_defaults(fn=cmd_search)

    b = sub.add_parser("bench", help="time one training step of each algorithm against bp")
    model_args(b, arch_default="784-300-300-100-10", init="normal(0.05)")
    b.add_argument("--algos", help="comma-separated specs (default bp,ar,ar:mode=simulate,steps=100)")
    b.add_argument("--bias", action="store_true", help="MLP with biases (default none)")
    b.add_argument("--repeats", type=_int_at_least(1), default=50, help="timed steps per algorithm (default 50)")
    b.add_argument("--warmup", type=_int_at_least(0), default=5, help="untimed steps first (default 5)")
    b.set_defaults(fn=cmd_bench)

    ls = sub.add_parser("list", help="the algorithms with their options and defaults, the built-in models, "
                                     "the datasets")
    ls.add_argument("--json", action="store_true", help="print them as JSON")
    ls.set_defaults(fn=cmd_list)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``KEY=VALUE`` arguments may stand anywhere among the flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def _os_error(e: OSError) -> str:
    """``cannot write PATH: No space left on device`` for an OSError with a file name."""
    verb = {errno.ENOSPC: "write", errno.EROFS: "write", errno.EDQUOT: "write", errno.EFBIG: "write",
            errno.ENOENT: "read", errno.EISDIR: "read"}.get(e.errno or 0, "access")
    return f"cannot {verb} {e.filename}: {e.strerror or e}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            args = parse_args(argv)
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        args.argv = argv
        return int(args.fn(args) or 0)
    except CreditlabError as e:
        print(f"creditlab: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        print("creditlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except OSError as e:
        if e.filename is None:
            raise
        print(f"creditlab: {_os_error(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
