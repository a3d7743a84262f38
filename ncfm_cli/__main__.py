"""``python -m ncfm_cli`` is the same as the ``ncfm`` command."""

from ncfm_cli.main import run

if __name__ == "__main__":
    run()
