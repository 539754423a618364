"""The command line on top of everything: `mnist-pipeline`, the local stack (local AWS, local SageMaker service,
Airflow) and its REST client. It may import any layer; nothing imports it but the tests and benchmarks.

What its modules share lives here: the error a command reports as one line rather than a traceback, and the console
they print on.
"""


class StackError(RuntimeError):
    """What went wrong on the local stack, told to the user as an error line (the command then exits non-zero)."""


def new_console():
    """The console the commands print on. Soft wrap: rich breaks no line of text itself, so a long URL stays one line
    to copy, and the terminal wraps it."""
    from rich.console import Console

    return Console(soft_wrap=True)
