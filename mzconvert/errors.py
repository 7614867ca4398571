"""The one error type the CLI turns into a clean one-line message and an exit code."""

# Exit codes (documented in docs/cli.md).
EXIT_OK = 0
EXIT_FAILURE = 1  # a stage ran and failed (conversion, verification threshold, vela budget)
EXIT_BAD_INPUT = 2  # the recipe, a calibration set, an argument or an input file is wrong
EXIT_FETCH = 3  # a source could not be obtained or did not match its checksum
EXIT_BUSY = 4  # another process holds the recipe's build lock


class MzError(Exception):
    """An expected failure: the message is shown as is, without a traceback."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class RecipeError(MzError):
    """A recipe or calibration set that does not validate; the message is located (file: field: ...)."""

    exit_code = EXIT_BAD_INPUT


class InputError(MzError):
    """A wrong argument, dataset, labels file or image: bad input that is not a recipe field."""

    exit_code = EXIT_BAD_INPUT


class RefusedVariant(MzError):
    """A variant whose fidelity is below its floors: it is not shipped; the build's other variants are."""


class FetchError(MzError):
    exit_code = EXIT_FETCH


class BusyError(MzError):
    exit_code = EXIT_BUSY


def short_text(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters: errors stay one bounded line."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else exc.__class__.__name__
    return first if len(first) <= limit else first[:limit] + "…"
