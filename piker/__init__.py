"""piker-bot: a headless automated-trading service on a tractor actor tree."""
# first, so that the MultiError deprecation filters are in place (and in the
# environment children inherit) before anything imports tractor
from . import log as _log  # noqa: F401
