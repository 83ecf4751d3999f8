"""One error type per kind of failure.

Every message is one line that names the file or key at fault and the fix. The CLI maps
each type to an exit code and prints the message without a traceback.
"""


class FlamefitError(Exception):
    """Base of every error flamefit raises on purpose."""

    exit_code = 1


class AssetError(FlamefitError):
    """A model, embedding, texture or weights file is missing, corrupt or unsafe."""

    exit_code = 3


class ImageError(FlamefitError):
    """An input image cannot be read or decoded."""

    exit_code = 4


class NoFaceError(FlamefitError):
    """No face (or no usable landmarks) was found for an image."""

    exit_code = 5


class LandmarkError(FlamefitError):
    """A landmark file is unreadable or has the wrong number of points."""

    exit_code = 6


class RecipeError(FlamefitError):
    """A recipe file or a --set override is invalid."""

    exit_code = 7


class FitError(FlamefitError):
    """The optimisation could not produce a finite result."""

    exit_code = 8


class UsageError(FlamefitError):
    """Command arguments that do not fit together (e.g. incompatible fits)."""

    exit_code = 2
