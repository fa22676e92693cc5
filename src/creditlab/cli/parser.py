"""The argument parser of every subcommand, with a help text on every option."""

from __future__ import annotations

import argparse

from creditlab import __version__
from creditlab.cli.commands import (
    cmd_bench,
    cmd_check,
    cmd_collect,
    cmd_compare,
    cmd_list,
    cmd_relax,
    cmd_record,
    cmd_results,
    cmd_search,
    cmd_tables,
    cmd_train,
)
from creditlab.errors import ConfigError

DESCRIPTION = """The ``creditlab`` command line: train, compare, collect, check, relax, bench, search, list,
results, tables.

train, compare and search take the config's keys as ``KEY=VALUE`` arguments (dotted for nested
keys: ``optimizer.lr=1e-3 model.arch=784-100-10 epochs=3``), validated by the same schema;
their flags (``--epochs``, ``--algo``, ...) are short forms of some of these keys.

Errors a user can fix (bad config, missing or corrupted data, divergence) are printed as one
message without a traceback; exit codes: 2 bad input, 3 divergence, 4 a collected comparison
with missing or unfinished runs, 1 a table in docs/ that differs from results/ (tables),
130 interrupted (Ctrl-C), 143 stopped by SIGTERM."""


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
    p = _Parser(prog="creditlab", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    def writing(sp, into: str):
        """The flags of the commands that write runs (train, compare)."""
        sp.add_argument("--tensorboard", action="store_true",
                        help=f"also write TensorBoard event files into {into} (config key logging.tensorboard; "
                             'needs pip install -e ".[tensorboard]"); view with tensorboard --logdir OUT')
        sp.add_argument("--overwrite", action="store_true", help="replace an existing run in --out (removes it first)")

    t = sub.add_parser("train", help="train one algorithm and seed")
    common(t, "run", "continue the run in --out from its checkpoint (without --config: with the run's stored "
                     "config.yaml)")
    t.add_argument("--algo", help="algorithm spec (config key algo), e.g. ar:steps=100,eta=0.1; see creditlab list")
    t.add_argument("--seed", type=int, dest="config_seed", metavar="SEED", help="seed of the run (config key seed)")
    t.add_argument("--nproc", type=int, help="data-parallel processes on this machine (runs torchrun --standalone)")
    writing(t, "the run directory")
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
    writing(c, "every run's directory")
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

    b = sub.add_parser("bench", help="time one training step of each algorithm against bp, and measure its memory")
    model_args(b, arch_default="784-300-300-100-10", init="normal(0.05)")
    b.add_argument("--algos", help="comma-separated specs (default bp,ar,ar:mode=simulate,steps=100)")
    b.add_argument("--bias", action="store_true", help="MLP with biases (default none)")
    b.add_argument("--repeats", type=_int_at_least(1), default=50, help="timed steps per algorithm (default 50)")
    b.add_argument("--warmup", type=_int_at_least(0), default=5, help="untimed steps first (default 5)")
    b.add_argument("--threads", type=_int_at_least(1), help="torch threads (default: torch's)")
    b.add_argument("--clock", default="wall", help="wall (elapsed time, default) or cpu (this process's CPU time, "
                                                   "all threads: on a shared machine, use it with --threads 1)")
    b.add_argument("--optimizer", default="sgd", help="sgd (no state, default) or adam (two moments per "
                                                       "parameter, as the Bartunov experiments train)")
    b.add_argument("--no-memory", action="store_true",
                   help="time only; by default each algorithm's memory is also measured, in a fresh process each "
                        "(CPU: resident set; CUDA: the allocator's peak)")
    b.add_argument("--memory-steps", type=_int_at_least(1), default=3,
                   help="training steps of each memory measurement (default 3)")
    b.add_argument("--lc-layers", nargs="?", const="mnist,cifar,imagenet", metavar="NETS",
                   help="instead of algorithms: LocallyConnected2d forward+backward against an equally shaped "
                        "Conv2d for every layer of the Table 3 networks NETS (default mnist,cifar,imagenet)")
    b.set_defaults(fn=cmd_bench)

    ls = sub.add_parser("list", help="the algorithms with their options and defaults, the built-in models, "
                                     "the datasets")
    ls.add_argument("--json", action="store_true", help="print them as JSON")
    ls.set_defaults(fn=cmd_list)
    rs = sub.add_parser("results", help="committed results: results add RUN_DIR copies a finished comparison into "
                                        "results/<paper>/<experiment>/, results record -- COMMAND records a "
                                        "measurement's JSON there")
    rsub = rs.add_subparsers(dest="results_action", required=True, metavar="ACTION",
                             help="add: copy a finished compare or collect directory into results/; record: run a "
                                  "--json measurement and write its record.json")
    ra = rsub.add_parser("add", help="copy a finished comparison's configs, summaries and metrics.csv (no checkpoints, "
                                     "no plots) into ROOT/PAPER/EXPERIMENT/")
    ra.add_argument("dir", metavar="RUN_DIR", help="a finished creditlab compare --out directory, or a collected plan")
    ra.add_argument("--paper", required=True, help="the paper's folder in results/, e.g. activation-relaxation")
    ra.add_argument("--experiment", required=True, help="the experiment's folder, e.g. ar-mnist (the YAML's name)")
    ra.add_argument("--root", default="results", help="the results folder (default results, in the current directory)")
    ra.add_argument("--overwrite", action="store_true", help="replace an existing result (removes it first)")
    ra.add_argument("--diverged-ok", action="store_true",
                    help="commit diverged runs as such (their config, diverged.json and the metrics they wrote; "
                         "tables show them as diverged at their step) instead of refusing the comparison")
    ra.set_defaults(fn=cmd_results)
    rr = rsub.add_parser("record", help="run COMMAND (creditlab bench/check ... --json, python scripts/X.py ... "
                                        "--json), write ROOT/PAPER/EXPERIMENT/record.json: the command, its JSON, the "
                                        "environment (commit, torch, CPU, threads, load average before and after)")
    rr.add_argument("--paper", required=True, help="the paper's folder in results/, e.g. gait")
    rr.add_argument("--experiment", required=True, help="the measurement's folder, e.g. gait-bench")
    rr.add_argument("--root", default="results", help="the results folder (default results, in the current directory)")
    rr.add_argument("--overwrite", action="store_true", help="replace an existing record")
    rr.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                    help="the measurement, after --, as typed (NAME=VALUE words first set its environment)")
    rr.set_defaults(fn=cmd_record)

    tb = sub.add_parser("tables", help="write the results tables in docs/ from results/ (spec: docs/tables.yaml)")
    tb.add_argument("--check", action="store_true", help="write nothing: exit 1, naming doc, table and row, where a "
                                                         "doc differs from what results/ gives")
    tb.add_argument("--root", default=".", help="the repository root (default: the current directory)")
    tb.add_argument("--spec", help="the table spec (default ROOT/docs/tables.yaml)")
    tb.set_defaults(fn=cmd_tables)
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


