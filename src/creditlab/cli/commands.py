"""One function per subcommand: ``cmd_NAME(args) -> exit code``."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from creditlab import config as config_mod
from creditlab.cli.args import (
    _csv,
    _default_run_dir,
    _explicit,
    _floats,
    _load_cfg,
    _overrides,
    _shape,
    _stored,
)
from creditlab.errors import ConfigError


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
    cfg, over, note = _load_cfg(args, base=base, all_algos=True)
    if note:
        print(note, flush=True)
    if args.plan:
        for flag, given in (("--out", args.out), ("--jobs", args.jobs != 1), ("--resume", args.resume),
                            ("--overwrite", args.overwrite)):
            if given:
                raise ConfigError(f"compare --plan DIR writes the runs' command lines into DIR instead of running "
                                  f"them; drop {flag}")
        runs = plan(cfg, args.plan)
        commands = Path(args.plan) / COMMANDS
        where = "" if Path(args.plan).is_absolute() else f" (its paths are relative to {Path.cwd()}: run it from there)"
        print(f"planned {len(runs)} runs; one creditlab train command per line in {commands}{where}")
        print(f"SLURM job array:  sbatch --array=1-{len(runs)} --wrap 'sed -n \"${{SLURM_ARRAY_TASK_ID}}p\" {commands} | bash'")
        print(f"then:             creditlab collect {Path(args.plan)}")
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
        plot_relaxation(out / "relax_layers.png", {rf"$x^{{{l + 1}}}$": [row[l] for row in layers] for l in range(len(layers[0]))},
                        rf"$\eta$ = {ref} ({args.schedule})")
        plot_relaxation(out / "relax_etas.png", {rf"$\eta$ = {e}": res["mean"][e] for e in res["mean"]}, "mean over layers")
    if args.json:
        print(json.dumps(res))
    else:
        for e, tr in res["mean"].items():
            print(f"eta {e:>6}: MSE to backprop gradient at t=0 {tr[0]:.3e}, t={len(tr) - 1} {tr[-1]:.3e}")
        if args.out:
            print(f"written: {args.out}/relax.json, relax_layers.png, relax_etas.png")
    return 0


def cmd_bench(args) -> int:
    from creditlab.bench import run_bench, run_lc_layers

    if args.lc_layers is not None:
        given = [flag for flag, v in (("--algos", args.algos), ("--model", args.model)) if v]
        if given:
            raise ConfigError(f"bench --lc-layers times single layers, not algorithms; drop {' and '.join(given)}")
        res = run_lc_layers(_csv(args.lc_layers), batch=args.batch, dtype=args.dtype, device=args.device or "cpu",
                            repeats=args.repeats, warmup=args.warmup, threads=args.threads, clock=args.clock)
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        print(f"LocallyConnected2d forward+backward against Conv2d, median of {res['repeats']} ({res['device']}, "
              f"{res['threads']} threads, {res['dtype']}, batch {res['batch']}, {res['clock']} clock)")
        for r in res["layers"]:
            shape = f"{'x'.join(map(str, r['in_shape']))} k{r['kernel']} s{r['stride']} -> {'x'.join(map(str, r['out_shape']))}"
            print(f"  {r['layer']:<11} {shape:<28} conv {r['conv_ms']:9.2f} ms   LC {r['lc_ms']:9.2f} ms   "
                  f"{r['ratio']:5.2f}x")
        return 0
    algos = _csv(args.algos) or ["bp", "ar", "ar:mode=simulate,steps=100"]
    arch = None if args.model else args.arch
    res = run_bench(algos, arch=arch, model=args.model, act=args.act, out_act=args.out_act, bias=args.bias,
                    init=args.init, batch=args.batch, loss=args.loss, dtype=args.dtype, device=args.device or "cpu",
                    repeats=args.repeats, warmup=args.warmup, in_shape=_shape(args.in_shape), classes=args.classes,
                    memory=not args.no_memory, memory_steps=args.memory_steps, threads=args.threads,
                    clock=args.clock, optimizer=args.optimizer)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"one training step, median of {res['repeats']} ({res['device']}, {res['threads']} threads, "
          f"{res['dtype']}, batch {res['batch']}, {res['optimizer']}, {res['clock']} clock)" + ("" if args.no_memory else
          f"; memory over {res['memory_steps']} steps in a fresh process each: peak, and what training adds to "
          "the model and batch"))
    for r in res["results"]:
        line = f"  {r['algo']:<44} {r['ms_per_step']:9.3f} ms   {r['ratio_vs_bp']:6.2f}x bp"
        if "memory" in r:
            m = r["memory"]
            line += f"   peak {m['peak_bytes'] / 2**20:9.1f} MiB   +{m['step_bytes'] / 2**20:8.1f} MiB"
        print(line)
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




def cmd_results(args) -> int:
    from creditlab.results import add

    dest = add(args.dir, args.paper, args.experiment, root=args.root, overwrite=args.overwrite,
               diverged_ok=args.diverged_ok)
    files = sum(1 for f in dest.rglob("*") if f.is_file())
    print(f"added {args.dir} -> {dest} ({files} files); then: creditlab tables")
    return 0


def cmd_record(args) -> int:
    from creditlab.results import record

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    path = record(cmd, args.paper, args.experiment, root=args.root, overwrite=args.overwrite)
    env = json.loads(path.read_text())["environment"]
    print(f"recorded {path} ({env['seconds']} s, load average {env['load_before']} -> {env['load_after']}); then: "
          f"creditlab tables")
    return 0


def cmd_tables(args) -> int:
    from creditlab.tables import run

    changed, problems = run(args.root, args.spec, check=args.check)
    for p in problems:
        print(f"creditlab: {p}", file=sys.stderr)
    if problems:
        what = (f"{len(changed)} table(s) differ from results/; creditlab tables regenerates them" if args.check
                else "nothing written")
        print(f"creditlab: tables: {len(problems)} problem(s); {what}", file=sys.stderr)
        return 1
    verb = "differ" if args.check else "rewritten"
    print("\n".join(f"{verb}: {c}" for c in changed) or "tables: every table agrees with results/")
    return 0
