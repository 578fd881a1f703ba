"""One-line errors for the command-line tools (launch, generate, sweep): a user's mistake
(a bad flag value, config, binding or workdir) is printed as the one line that names it; the
traceback only with --verbose. Anything not in USER_ERRORS is a bug and keeps its traceback.
"""
import sys
import traceback

# Bad input (ValueError), bad gin syntax, missing or unreadable files, a run that diverged.
USER_ERRORS = (ValueError, SyntaxError, OSError, FloatingPointError)


def one_line_error(err: BaseException, verbose: bool, prog: str) -> int:
    """Prints `err` as one line on stderr (after its traceback with `verbose`); returns the
    exit status, 1."""
    if verbose:
        traceback.print_exception(err)
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"{prog}: error: {message}" + ("" if verbose else " (--verbose for the traceback)"),
          file=sys.stderr)
    return 1
