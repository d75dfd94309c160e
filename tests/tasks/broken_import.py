"""A task module that raises while it is imported."""

raise ImportError("this module fails at import, on purpose")  # line 3: the test checks this line


def never(options):
    return True
