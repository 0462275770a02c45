"""Profiles and the config file: the records (model), finding, reading and validating the file (file), and the
needs learned from recorded runs (history)."""
