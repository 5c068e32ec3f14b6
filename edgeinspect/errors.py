"""Exceptions with messages meant for the person at the terminal.

Every error edgeinspect raises on bad input derives from :class:`EdgeInspectError`, so the CLI
can print the message (which names the offending path or value) without a traceback.
"""


class EdgeInspectError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class DataError(EdgeInspectError):
    """A dataset folder, image or mask is missing, empty or unreadable."""


class FrameError(DataError):
    """A frame that is not like the training images (size, channels, bit depth) or not an image at all."""


class BundleError(EdgeInspectError):
    """A model bundle is missing a file, fails its checksum or has an unknown schema."""


class SourceError(EdgeInspectError):
    """A camera or frame source cannot be opened, or failed while reading."""


class ExportError(EdgeInspectError):
    """An engine could not be written, or its parity with the PyTorch model failed."""


class ConfigError(EdgeInspectError):
    """A configuration file or override is invalid."""


class EngineError(EdgeInspectError):
    """An engine could not judge a frame (a remote inference server that is down or failing)."""
