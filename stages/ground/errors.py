"""The one exception type users see."""


class BuildError(Exception):
    """A failure caused by the user's input or environment, not by a bug.

    The message names the file, line or field at fault and says what to do;
    doit prints it as one paragraph and exits non-zero, without a traceback.
    """
