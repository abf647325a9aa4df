"""Ray runtime-env hook for the harness's simulations (RAY_RUNTIME_ENV_HOOK).

Flower's Ray backend passes `runtime_env={"env_vars": {"PYTHONPATH": ...}}` to `ray.init()` so
that actors can import the app from the FAB copy it installed. Any runtime env makes Ray start
each actor's worker through `setup_worker.py`, which execs a second interpreter (a second
`import ray`): about 1-2 s per actor on a 2-core machine, paid in every run's first round. The
harness only ever runs this project's app and sets the hook only when that app is installed
(editable) in the environment the workers start from, so the workers import the very same code
without the PYTHONPATH; any other runtime env passes through untouched.
"""

from __future__ import annotations

from typing import Any

HOOK = "simulations.ray_hook.drop_pythonpath_only_env"


def drop_pythonpath_only_env(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    if runtime_env and set(runtime_env) == {"env_vars"} and set(runtime_env["env_vars"]) <= {"PYTHONPATH"}:
        return None
    return runtime_env
