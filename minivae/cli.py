"""`minivae <command> ...` (also `python -m minivae ...`).

Each command lives in ``minivae/commands/<name>.py`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Command modules import
heavy things (matplotlib, torch) inside ``run`` so that ``minivae --help`` stays fast.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import importlib
import os
import signal
import sys
import threading

# name -> module; the order is the order in --help
COMMANDS = {
    "train": "minivae.commands.train",
    "evaluate": "minivae.commands.evaluate",
    "sample": "minivae.commands.sample",
    "info": "minivae.commands.info",
    "gradcheck": "minivae.commands.gradcheck",
    "compare": "minivae.commands.compare",
    "study": "minivae.commands.study",
}


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


class Terminated(BaseException):
    """SIGTERM (``timeout``, a scheduler) reached a command outside a handler of its own
    (``train`` has one while it trains): raised where Python runs next, so that the
    ``finally`` and ``except`` blocks on the way up (a half-written file's clean-up) run;
    exit status 143."""


#: the signal that reached a command run under :func:`_signals_raise`, else None. The
#: exception its handler raises can be lost on the way up: C++ code converting arguments
#: clears it and raises its own (matplotlib's pybind11 ``affine_transform`` in ``savefig``: a
#: TypeError, "incompatible function arguments"), and a garbage-collector callback or
#: ``__del__`` that it lands in swallows it (JAX's ``_xla_gc_callback``). The exit then
#: follows the signal, not what surfaced.
_received: "signal.Signals | None" = None
_raised: list = []                  # the exceptions the handler raised (told from others)
_resend: list = []                  # timers delivering a swallowed signal again
_exiting = False                    # main() runs as the program (entry): it exits after
_real_import = builtins.__import__


def _resend_soon(signum) -> None:
    """Deliver ``signum`` to this process again in 20 ms (cancelled when the command ends)."""
    t = threading.Timer(0.02, os.kill, (os.getpid(), signum))
    t.daemon = True
    _resend.append(t)
    t.start()


# Imports are whole to a signal: one that arrives while the main thread imports is raised
# when the outermost import statement returns. Raised inside an import, the exception can end
# the process: torch's C++ (torch._C's init, torch.distributed's _c10d_init) calls back into
# Python, and pybind11 turns an exception there into std::terminate, SIGABRT and a core
# dump. builtins.__import__ is wrapped while the handlers are in place (`import x`, and
# __import__, go through it).
_import_depth = 0
_deferred = False


def _counting_import(*args, **kwargs):
    global _import_depth, _deferred
    if threading.get_ident() != threading.main_thread().ident:
        return _real_import(*args, **kwargs)
    _import_depth += 1
    try:
        return _real_import(*args, **kwargs)
    finally:
        _import_depth -= 1
        if _import_depth == 0 and _deferred:
            _deferred = False
            _raise_signal()


def _on_signal(signum, frame):
    global _received, _deferred
    _received = signal.Signals(signum)
    if _import_depth > 0:               # raised when the outermost import returns
        _deferred = True
        return
    _raise_signal()


def _signal_exception():
    """A fresh exception for the signal in :data:`_received`."""
    return Terminated() if _received == signal.SIGTERM else KeyboardInterrupt()


def _raise_signal():
    """Raise the exception for the signal in :data:`_received`, known as the handler's own
    (:data:`_raised`: the unraisable hook tells it from others)."""
    e = _signal_exception()
    _raised.append(e)
    raise e


def signal_exit(e: BaseException):
    """(exit status, words) for an exception that a signal raised: KeyboardInterrupt (130,
    "interrupted") or :class:`Terminated` (143, "terminated (SIGTERM)"), with what the
    command added after a colon (train: what is saved); None for any other."""
    if isinstance(e, Terminated):
        status, words = 143, "terminated (SIGTERM)"
    elif isinstance(e, KeyboardInterrupt):
        status, words = 130, "interrupted"
    else:
        return None
    return status, words + (f": {e}" if str(e) else "")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``minivae train: error: argument --batch: ... (see
    'minivae train --help')``, exit status 2. argparse's own prints the whole usage block
    first, which for ``train`` is 18 lines above the one that names the problem. The
    subcommands' parsers are of this class too (add_subparsers makes them like their parent).
    Under ``mpiexec -n N`` every rank parses the same command line, so rank 0 alone prints
    (errors, --help, --version), instead of N copies of the same text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def _print_message(self, message, file=None):
        from .engine.mpi import launched_rank

        if launched_rank() in (None, 0):
            super()._print_message(message, file)


#: the commands that run over the ranks of an mpiexec launch; the others run on rank 0 alone
MPI_COMMANDS = ("train", "study")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="minivae",
        description="A from-scratch VAE with hand-written, gradient-checked backward passes.",
    )
    parser.add_argument("--version", action="version", version=f"minivae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
        parser.commands[name] = p
    return parser


@contextlib.contextmanager
def _signals_raise():
    """Inside the block, SIGTERM raises :class:`Terminated` and Ctrl-C (SIGINT)
    ``KeyboardInterrupt`` (in the main thread, where Python lets a handler be set), and
    :data:`_received` records which arrived; the previous handlers are restored after.
    ``train``'s Trainer sets its own while it trains (it saves, then exits 143 or 130); these
    cover the rest, as the figures it writes after (before, SIGTERM there killed the process
    with a half-written ``*.png.*.tmp`` left in the run directory). A signal's exception that
    a garbage-collector callback swallowed is not printed as "Exception ignored in ..."."""
    global _received, _real_import, _import_depth, _deferred
    _received = None
    _raised.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signals.append(signal.SIGINT)           # not where Ctrl-C was set to be ignored
    previous_hook = sys.unraisablehook

    def hook(unraisable):
        # our exception, swallowed where Python cannot raise it (a garbage-collector callback,
        # __del__): not reported, and the signal comes again to stop the command
        if any(unraisable.exc_value is e for e in _raised):
            _resend_soon(_received)
        else:
            previous_hook(unraisable)

    _real_import, _import_depth, _deferred = builtins.__import__, 0, False
    previous = {s: signal.signal(s, _on_signal) for s in signals}
    sys.unraisablehook = hook
    builtins.__import__ = _counting_import
    try:
        yield
    finally:
        builtins.__import__ = _real_import
        for t in _resend:               # first: a timer firing later would find no handler
            t.cancel()
        _resend.clear()
        for s, h in previous.items():
            # the program on its way out because of a signal: a second one does not kill it
            # before it exits with the first one's status
            signal.signal(s, signal.SIG_IGN if _exiting and _received is not None else h)
        sys.unraisablehook = previous_hook


def _run_command(args) -> int:
    """The command's exit status. Where a signal arrived, the exit follows it (143 or 130),
    whatever became of the exception its handler raised: replaced by C code with an error of
    its own (not exit 2 with the C code's words), or swallowed where Python cannot raise it
    (not exit 0 as if no signal had come)."""
    try:
        status = int(args._run(args) or 0)
    except BaseException as e:
        if _received is None:
            raise
        want = Terminated if _received == signal.SIGTERM else KeyboardInterrupt
        if isinstance(e, want):
            raise
        said = e.args if isinstance(e, (Terminated, KeyboardInterrupt)) else ()
        raise want(*said) from None        # a signal's exception keeps what the command added
    if _received is not None:
        raise _signal_exception()
    return status


def _one_line(e: BaseException) -> str:
    """The error's own words: an OSError without Python's "[Errno 28] " prefix (its text and
    the file it names)."""
    if isinstance(e, OSError) and e.strerror:
        names = [str(f) for f in (e.filename, e.filename2) if f is not None]
        return e.strerror + (f": {' -> '.join(names)}" if names else "")
    return str(e)


def main(argv=None) -> int:
    """``minivae ...``: the exit status. The signal handlers (:func:`_signals_raise`) cover it
    from its first line, so that Ctrl-C or SIGTERM while the commands' modules load is one
    line too; a command's own signal is reported under its name, one before the command is
    known (or in argparse's exit) as ``minivae``. Not covered: Python's start and this
    module's import, before ``main`` runs (about 0.07 s in all: ``import minivae`` loads no
    submodule, and this module only the standard library; ``tests/test_imports.py``)."""
    try:
        try:
            with _signals_raise():
                status = _main(argv)
        except SystemExit:          # argparse's --help, --version or usage error
            if _received is None:
                raise
            status = None
        if _received is not None and status not in (130, 143):
            raise _signal_exception()   # a signal swallowed and not yet raised
    except (KeyboardInterrupt, Terminated) as e:
        status, words = signal_exit(e)
        print(f"minivae: {words}", file=sys.stderr)
    return status


def entry() -> None:
    """The program (``minivae``, ``python -m minivae``): :func:`main`, then exit with its
    status. Once a signal has decided the exit, another is ignored on the way out (Python's
    exit with torch and JAX loaded takes up to a second; a second SIGTERM there killed the
    process by the signal instead of letting it exit 143)."""
    global _exiting
    _exiting = True
    sys.exit(main())


def _main(argv) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:         # named by the command's parser: 'minivae train: error: unrecognized ...'
        parser.commands.get(args.command, parser).error(
            f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):     # a bare `minivae`: one line, as any other misuse
        parser.error(f"a command is required: {', '.join(COMMANDS)}")
    from .engine.mpi import launched_rank, launched_size

    ranks = launched_size()
    if args.command not in MPI_COMMANDS and ranks not in (None, 1):
        # evaluate, sample, info, ... are one process's work: under mpiexec -n N, rank 0 does
        # it and the other ranks do nothing (N copies would print N times and write one file
        # at once)
        if launched_rank() not in (None, 0):
            return 0
        others = f"ranks 1-{ranks - 1}" if ranks > 2 else "rank 1" if ranks == 2 else "the others"
        print(f"minivae {args.command}: runs as one process: rank 0 of this mpiexec launch "
              f"does it, {others} nothing", file=sys.stderr)
    from .backend import BackendUnavailable
    from .engine.threads import one_blas_thread
    from .train import RunLocked

    try:
        # Every command runs its matrix products on one BLAS thread (the step's own team
        # splits the batch): OpenBLAS's idle threads busy-wait and slow a shared machine.
        from .engine import blas, kernels, threads
        # a bad MINIVAE_TEAM_SPIN_US, MINIVAE_BLAS_TEAM or MINIVAE_NUM_THREADS: one line,
        # before any work (nothing written, no run directory made)
        kernels.spin_from_env()
        kernels.check_env()
        blas.team_wanted()
        threads.get_num_threads()
        with one_blas_thread():
            return _run_command(args)
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0
    except (UserError, BackendUnavailable, RunLocked, FileNotFoundError, ValueError, TypeError,
            OSError, MemoryError, FloatingPointError) as e:   # FloatingPointError: a refused
        # NaN/Inf step (minivae.NonFiniteStep) outside the trainer, which reports its own
        print(f"minivae {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        status, words = signal_exit(e)
        print(f"minivae {args.command}: {words}", file=sys.stderr)
        return status


if __name__ == "__main__":
    entry()
