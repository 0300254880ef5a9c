"""Errors the CLI turns into a one-line message and a non-zero exit."""


class DeployError(Exception):
    """Bad input or an unmet requirement; the message is shown to the user as one line."""


class ThresholdMissed(DeployError):
    """A recipe threshold was missed: the build is complete and reported, but it fails."""
