"""One run's life outside the engine: its config assembled (presets, overrides, the method resolved), the task
loop (`Runner`), the checkpoint file format, the folder lock, and export / predict from a finished run folder."""
