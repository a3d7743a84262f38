"""ncfm_cli: the ``ncfm`` command line, a thin Typer layer over ``ncfm_core``."""

import os

# Idle OpenMP threads sleep instead of spinning, unless the user chose otherwise (an empty value
# keeps libgomp's own spin-then-sleep). On a 2-core machine shared with other jobs, torch's two
# threads spinning at every barrier burned 4 times the CPU time of the work and slowed the README's
# first command several-fold (docs/benchmarks/first_contact.md). OpenMP reads this once, when torch
# loads: hence here, before any command module imports torch. The library never sets it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
