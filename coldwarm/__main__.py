"""``python -m coldwarm``: the same command as the ``coldwarm`` script (torchrun launches it this way)."""

from coldwarm.cli import app

if __name__ == "__main__":
    app()
