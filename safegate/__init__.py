"""safegate: stop heavy ML jobs from freezing the machine."""

__version__ = "0.1.0"
