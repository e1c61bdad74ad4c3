"""The base class of every error that bad input causes: a params key, a data or weights file, a model
directory. The stages and the ``medmerge`` command report one as a single line, not a traceback; its
message names the file, key or value and what was expected."""


class InputError(Exception):
    """Bad input from the user; each library module derives its own named errors from it."""
