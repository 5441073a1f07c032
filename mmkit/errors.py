"""Errors meant for people: the CLI prints them in one line, without a traceback."""


def one_line(error: BaseException, whole: bool = False) -> str:
    """``TypeName: first line of the message`` (``whole``: every line, joined by "; "),
    for reports that must fit on one line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {'; '.join(lines) if whole else lines[0]}"


class MMKitError(Exception):
    """A problem the user can fix: bad recipe, unknown component, missing file or download."""


class RecipeError(MMKitError):
    """A recipe that does not validate; holds every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))
