"""Errors the CLI turns into a one-line message and a non-zero exit."""

from contextlib import contextmanager


class DeployError(Exception):
    """Bad input or an unmet requirement; the message is shown to the user as one line."""


class ThresholdMissed(DeployError):
    """A recipe threshold was missed: the build is complete and reported, but it fails."""


@contextmanager
def traced(stage: str, model, switch: str):
    """Around a stage that traces a PyTorch model (torch.fx, Torch-Pruning): a model it cannot follow is a
    one-line error naming the stage and the recipe switch that skips it, not a traceback."""
    try:
        yield
    except DeployError:
        raise
    except Exception as err:  # noqa: BLE001 - fx and Torch-Pruning raise many types on untraceable code
        text = str(err).strip().splitlines()
        raise DeployError(f"{stage} cannot follow {type(model).__name__} ({type(err).__name__}: "
                          f"{text[0][:200] if text else ''}); set {switch} to skip this stage") from None  # fmt: skip
