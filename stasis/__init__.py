"""stasis: checkpoint running containers and restore them anywhere."""

__version__ = "0.1.0"
