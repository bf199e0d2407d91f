"""The errors zoo raises on bad input: each names what is wrong and where."""


class ConfigError(ValueError):
    """A model or training config is invalid. The message names the file and the key path."""

    def __init__(self, file, keypath: str, message: str):
        self.file = str(file) if file is not None else "<config>"
        self.keypath = keypath
        self.message = message
        where = f"{self.file}: {keypath}" if keypath else self.file
        super().__init__(f"{where}: {message}")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model. The message names the file."""


class DataError(ValueError):
    """The images on disk do not make a data set the run can use (classes missing, empty, unmatched)."""


class TrainingStopped(RuntimeError):
    """A run stopped before its end (interrupted, a write failed, the loss diverged). The message
    says why and names the last good checkpoint, from which ``--resume`` continues."""
