"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class MergetuneError(Exception):
    """A problem with the user's input or environment, stated so they can fix it.

    The message names the file, field, tensor or shape at fault; the CLI prints it
    without a traceback.
    """
