"""`python -m simulations.audit EXPERIMENT.toml`: see simulations/audit/command.py."""

from __future__ import annotations

from simulations.audit.command import main

raise SystemExit(main())
