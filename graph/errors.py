"""The one error type a workflow can fail with: its message is the single line the CLI prints."""


class WorkflowError(ValueError):
    """A workflow cannot run; the message names the node and the problem."""
