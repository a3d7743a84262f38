"""ncfm_cli: the ``ncfm`` command line, a thin Typer layer over ``ncfm_core``."""
