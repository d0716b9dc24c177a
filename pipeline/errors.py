"""The one exception type that the command line turns into a message and an exit code."""


class PipelineError(Exception):
    """A failure the user can act on; its message names the file or key and the fix."""
