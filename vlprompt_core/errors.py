"""Errors that are the user's to fix: the CLI prints them as lines, never a traceback."""


class UserError(Exception):
    """A mistake in what the user asked for (spec, paths, names).

    ``problems`` is a list of one-line messages, each naming the field or file at fault.
    """

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))
