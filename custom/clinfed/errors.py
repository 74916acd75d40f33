"""Errors a person reads, importable without the training stack (torch, Opacus, MONAI)."""


class SiteDataError(ValueError):
    """A site's data is missing or malformed; the message names the site and the path or column."""


class SiteRefusal(RuntimeError):
    """The site declines to take part (its policy, keys or budget say no); the message names the site."""
