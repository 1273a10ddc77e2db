"""The one error type of the library."""


class ReuseError(ValueError):
    """Raised for input the library cannot work with.

    The message states the rule that broke, then the context (module, shape, option) and the fix.
    It subclasses ``ValueError`` so code that already catches bad values keeps working.
    """
