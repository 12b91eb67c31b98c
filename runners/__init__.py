"""The ``querycache`` command line and runner presets."""
