"""The one exception family gptlab raises for bad input: the CLI prints its message on one line."""


class GptlabError(Exception):
    """A user-facing error whose message names the file, key or value and how to fix it."""
