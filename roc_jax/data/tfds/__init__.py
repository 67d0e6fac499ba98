"""TFDS builders of the raw data sets (``mnre``, ``more``); importing a builder registers it."""
