"""One exception type for bad user input.

Library code raises `OwnLLMError("what: what was expected")` when a file, field or option is
wrong; the CLI turns it into one line on stderr and exit status 2. Anything else is a bug and
keeps its traceback.
"""


class OwnLLMError(Exception):
    """Bad input from the user: a missing file, an unknown name, a corrupt checkpoint…"""
