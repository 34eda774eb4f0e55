"""patchwatch: the command line that ties segmenters, export, serving, audits and edge bundles together."""

__version__ = "0.1.0"
