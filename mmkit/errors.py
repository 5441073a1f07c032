"""Errors meant for people: the CLI prints them in one line, without a traceback."""


def one_line(error: BaseException) -> str:
    """``TypeName: first line of the message``, for reports that must fit on one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class MMKitError(Exception):
    """A problem the user can fix: bad recipe, unknown component, missing file or download."""


class RecipeError(MMKitError):
    """A recipe that does not validate; holds every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))
