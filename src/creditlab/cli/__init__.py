"""The ``creditlab`` command line (console script ``creditlab`` and ``python -m creditlab``):
:mod:`.args` reads what a user typed, :mod:`.commands` runs each subcommand, :mod:`.parser`
builds the argument parser (its ``DESCRIPTION`` is the ``creditlab --help`` text: subcommands,
``KEY=VALUE`` overrides, exit codes); :func:`main` turns every error a user can fix into one
line and its exit code."""

from __future__ import annotations

import errno
import sys

from creditlab.cli.args import _split_specs  # noqa: F401 (tested directly)
from creditlab.cli.commands import launch_nproc, rerun_line
from creditlab.cli.parser import build_parser, parse_args
from creditlab.errors import CreditlabError

__all__ = ["main", "parse_args", "build_parser", "rerun_line", "launch_nproc"]


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


