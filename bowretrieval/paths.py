"""Where third-party test data lives: one setting, ``BOWR_SHARED_DATA`` (default ``../shared/data``)."""
import os
from pathlib import Path

ENV_VAR = "BOWR_SHARED_DATA"


def shared_data_dir() -> Path:
    """The folder with the shared real photos (landmarks-dev, scenes-dev, pairs, train-photos).

    ``$BOWR_SHARED_DATA`` when set; otherwise ``../shared/data`` next to the project checkout
    (found from the package location), falling back to ``../shared/data`` from the working directory.
    The folder may not exist: callers (tests, benchmarks) skip with a clear message then.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    candidate = repo.parent / "shared" / "data"
    if candidate.is_dir():
        return candidate
    return (Path.cwd().parent / "shared" / "data").resolve()
