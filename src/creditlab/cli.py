"""The ``creditlab`` command line: train, compare, collect, check, relax, bench, search.

Errors a user can fix (bad config, missing or corrupted data, divergence) are printed as one
message without a traceback; exit codes: 2 bad input, 3 divergence, 4 a collected comparison
with missing or unfinished runs, 130 interrupted."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from creditlab import config as config_mod
from creditlab.errors import ConfigError, CreditlabError, DivergenceError


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


def _ints(text: str | None) -> list[int] | None:
    return None if text is None else [int(s) for s in text.split(",") if s.strip()]


def _shape(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(s) for s in text.lower().split("x"))


def _load_cfg(args, **extra) -> dict:
    over = {"dataset": getattr(args, "dataset", None), "epochs": getattr(args, "epochs", None),
            "data_dir": getattr(args, "data_dir", None), "device": getattr(args, "device", None),
            "threads": getattr(args, "threads", None),
            "deterministic": True if getattr(args, "deterministic", False) else None, **extra}
    if args.config:
        return config_mod.load(args.config, **over)
    return config_mod.resolve(None, **over)


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


def cmd_train(args) -> int:
    from creditlab.distributed import in_launch
    from creditlab.train import train

    if args.nproc is not None:
        if args.nproc < 1:
            raise CreditlabError(f"--nproc {args.nproc}: give a number of processes >= 1")
        if in_launch():
            raise CreditlabError("--nproc inside a torchrun launch: drop --nproc (torchrun already started the processes)")
        if args.nproc > 1:
            return launch_nproc(args.nproc, args.argv)
    cfg = _load_cfg(args, algo=args.algo, seed=args.seed)
    out = Path(args.out or Path("runs") / f"{cfg['name']}-{cfg['algo'].replace(':', '_').replace(',', '_')}-s{cfg['seed']}")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        print(f"training {cfg['algo']} on {cfg['dataset']} -> {out}", flush=True)
    summary = train(cfg, out, resume=args.resume, progress=not args.quiet)
    if rank0:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_compare(args) -> int:
    from creditlab.compare import COMMANDS, QUICKSTART, compare, plan

    over = {"algos": _csv(args.algos), "seeds": _ints(args.seeds)}
    if args.config:
        cfg = _load_cfg(args, **over)
    else:
        over.update(dataset=args.dataset, epochs=args.epochs, data_dir=args.data_dir, device=args.device,
                    threads=args.threads)
        cfg = config_mod.resolve(QUICKSTART, **over)
    if args.plan:
        for flag, given in (("--out", args.out), ("--jobs", args.jobs != 1), ("--resume", args.resume)):
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
    summary = compare(cfg, out, progress=not args.quiet, resume=args.resume, jobs=args.jobs)
    print((out / "summary.md").read_text())
    print(f"run directory: {out}")
    if summary["diverged"]:
        print(f"creditlab: {len(summary['diverged'])} run(s) diverged; see summary.json", file=sys.stderr)
        return 3
    return 0


def cmd_collect(args) -> int:
    from creditlab.compare import COMMANDS, collect

    summary = collect(args.dir)
    print((Path(args.dir) / "summary.md").read_text())
    commands = Path(args.dir) / COMMANDS
    for o in summary.get("incomplete", []):
        print(f"creditlab: {o['status']}: {o['algo']} seed {o['seed']} in {o['dir']} ({o['message']}); "
              f"rerun: sed -n {o['line']}p {commands} | bash", file=sys.stderr)
    for d in summary["diverged"]:
        print(f"creditlab: diverged: {d['algo']} seed {d['seed']}: {d['message']}", file=sys.stderr)
    if summary.get("incomplete"):
        print(f"creditlab: {len(summary['incomplete'])} run(s) missing or unfinished; rerun their lines of "
              f"{commands} (an unfinished one with --resume appended), then collect again", file=sys.stderr)
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

    from creditlab.build import resolve_device
    from creditlab.diagnostics.relaxation import relaxation_traces
    from creditlab.losses import build_loss
    from creditlab.models import MLP, parse_arch
    from creditlab.plots import plot_relaxation

    etas = [float(e) for e in args.etas.split(",")]
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

    cfg = _load_cfg(args)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="creditlab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, data=True):
        sp.add_argument("--config", help="YAML experiment file")
        sp.add_argument("--out", help="run directory")
        sp.add_argument("--epochs", type=int)
        sp.add_argument("--dataset")
        sp.add_argument("--data-dir", help="folder with the dataset files (before $CREDITLAB_DATA and the cache)")
        sp.add_argument("--device")
        sp.add_argument("--threads", type=int, help="torch threads per run (config key threads)")
        sp.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint(s)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--deterministic", action="store_true", help="torch's deterministic algorithms (config key deterministic)")

    t = sub.add_parser("train", help="train one algorithm and seed")
    common(t)
    t.add_argument("--algo", help="algorithm spec, e.g. ar:steps=100,eta=0.1")
    t.add_argument("--seed", type=int)
    t.add_argument("--nproc", type=int, help="data-parallel processes on this machine (runs torchrun --standalone)")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("compare", help="every algorithm x seed on identical batches (default: the quick start)")
    common(c)
    c.add_argument("--algos", help="comma-separated specs, e.g. bp,ar,ar:feedback=learned,derivative=false")
    c.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    c.add_argument("--jobs", type=int, default=1,
                   help="parallel local processes (threads each: the config's, else cores // jobs); same numbers as serial")
    c.add_argument("--plan", metavar="DIR", help="write each run's config and one command line per run into "
                                                 "DIR/commands.txt (for a job array) instead of running; then collect DIR")
    c.set_defaults(fn=cmd_compare)

    g = sub.add_parser("collect", help="summarise a planned comparison (compare --plan DIR) from its finished runs")
    g.add_argument("dir", help="the plan directory")
    g.set_defaults(fn=cmd_collect)

    def model_args(sp, arch_default=None, bias_flag="--no-bias", init="xavier"):
        sp.add_argument("--arch", default=arch_default, help="MLP layer spec, e.g. 784-300-300-100-10")
        sp.add_argument("--model", help="built-in model name or package.module:factory")
        sp.add_argument("--act", default="relu")
        sp.add_argument("--out-act", default="linear")
        sp.add_argument("--init", default=init)
        sp.add_argument("--batch", type=int, default=64)
        sp.add_argument("--dtype", default="float32")
        sp.add_argument("--loss", default="mse")
        sp.add_argument("--device")
        sp.add_argument("--in-shape", help="input shape for --model, e.g. 1x28x28 or 3x32x32")
        sp.add_argument("--classes", type=int, default=10)
        sp.add_argument("--json", action="store_true")

    k = sub.add_parser("check", help="one batch: per-layer angle and error of an algorithm's updates vs autograd")
    model_args(k)
    k.add_argument("--algo", required=True)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--no-bias", action="store_true")
    k.add_argument("--dataset", help="take the batch from this dataset instead of random inputs")
    k.set_defaults(fn=cmd_check)

    r = sub.add_parser("relax", help="AR convergence trace to the backprop gradient (paper Fig. 1)")
    r.add_argument("--arch", default="784-300-300-100-10")
    r.add_argument("--act", default="relu")
    r.add_argument("--init", default="normal(0.05)")
    r.add_argument("--etas", default="0.5,0.2,0.1,0.05")
    r.add_argument("--steps", type=int, default=200)
    r.add_argument("--schedule", default="synchronous", choices=["synchronous", "sweep"])
    r.add_argument("--init-state", default="forward", choices=["forward", "zero"])
    r.add_argument("--loss", default="mse")
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dataset", help="take the batch from this dataset (e.g. mnist-mini)")
    r.add_argument("--out")
    r.add_argument("--device", help="cpu, cuda, cuda:N or auto (default cpu)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_relax)

    s = sub.add_parser("search", help="Optuna study over the config's space (default: Bartunov et al. Table 4), "
                                      "selected on the validation split")
    common(s)
    s.add_argument("--trials", type=int, default=60,
                   help="finished trials of the study in total, over all workers (the Bartunov et al. search used 60)")
    s.add_argument("--seed", type=int, default=0, help="seed of the search's sampler")
    s.add_argument("--sampler", choices=["random", "tpe"], help="default: the config's search.sampler, else random")
    s.add_argument("--storage", help="Optuna RDB URL shared by the workers (default sqlite:///OUT/search.db), "
                                     "e.g. postgresql://user:password@host/db")
    s.add_argument("--study", help="study name (default: the config's name); workers with the same storage and "
                                   "study join one search")
    s.add_argument("--workers", type=int, default=1, help="local worker processes joining the study")
    s.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between worker heartbeats; a killed worker's trial is marked failed after 2x this")
    s.set_defaults(fn=cmd_search)

    b = sub.add_parser("bench", help="time one training step of each algorithm against bp")
    model_args(b, arch_default="784-300-300-100-10", init="normal(0.05)")
    b.add_argument("--algos")
    b.add_argument("--bias", action="store_true")
    b.add_argument("--repeats", type=int, default=50)
    b.add_argument("--warmup", type=int, default=5)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.fn(args) or 0)
    except DivergenceError as e:
        print(f"creditlab: {e}", file=sys.stderr)
        return 3
    except CreditlabError as e:
        code = 130 if type(e).__name__ == "Interrupted" else 2
        print(f"creditlab: {e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("creditlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
