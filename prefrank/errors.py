"""prefrank's errors: the user's mistakes, told apart from bugs.

  InputError  a bad invocation or input (a missing file, an unknown column, an option value that
              cannot work, an unreadable table): the command line prints it as one line and exits 2
  WriteError  writing the output failed (a full disk, say): one line too; what is written so far
              stays, and --resume continues from it
  Stopped     a torchrun rank stopped by an InputError that rank 0 reports for the job: the rank
              exits 2 without repeating it, so the job says it in one line
  RowError    why one input row cannot be scored: it becomes that row's `error` in the table,
              never an exception out of the run
Anything else is a bug or a failure of the environment, and the command line shows its traceback.

Messages name options as <name>, the option's field name (a field of an options class, see
prefrank.options): `str(error)` shows the name, as a Python caller knows it; the command line
shows its flag. Anything else in angle brackets is left as it is.
"""
import re

_OPTION = re.compile(r"<([a-z][a-z0-9_]*)>")
OPTION_NAMES: set[str] = set()  # the fields of every options class (prefrank.options.options adds them)


class InputError(ValueError):
    """A bad invocation or input, reported in one line (see the module's docstring for <name>)."""

    def text(self, flags: dict[str, str] | None = None) -> str:
        """The message with each <name> of an option as `flags[name]` (its command-line flag), else
        as the name."""
        flags = flags or {}

        def name(match):
            option = match.group(1)
            return flags.get(option, option) if option in OPTION_NAMES else match.group(0)
        return _OPTION.sub(name, str(self.args[0]) if self.args else "")

    def __str__(self) -> str:
        return self.text()


class WriteError(InputError):
    """Writing the output failed: reported in one line; the parts written so far stay for --resume."""


class Stopped(InputError):
    """This torchrun rank stops because of an InputError that rank 0 reports: exit 2, no line of its own."""


class RowError(ValueError):
    """Why one row cannot be scored; becomes that row's `error`."""


def bad_input(e: BaseException) -> bool:
    """Whether a library refused what it was given (a missing or damaged file, an unknown id, a bad config
    or data file), as transformers, huggingface_hub, datasets, safetensors, pyarrow and tokenizers report
    it: OSError, ValueError, KeyError, ImportError (a missing optional package), their own error types, and
    the bare Exception of the tokenizers library's parser. Out of memory and bugs (TypeError,
    AttributeError, RuntimeError, ...) are not: they keep their traceback."""
    from pyarrow import ArrowException
    from safetensors import SafetensorError
    if isinstance(e, MemoryError):
        return False
    return isinstance(e, (OSError, ValueError, KeyError, ImportError, SafetensorError, ArrowException)) \
        or type(e) is Exception
