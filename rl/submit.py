"""``rl submit RECIPE [overrides] --address http://HEAD:8265``: run a recipe as a Ray Job.

The recipe is validated here first (fields and types; paths are the cluster's, so they are not
checked locally). The project directory travels as the job's ``working_dir`` (without the venv,
runs and caches), and the job runs ``python -m rl.cli train RECIPE [overrides]`` on the cluster,
where ``rl train`` joins the cluster instead of starting its own. Set ``output_dir`` to storage
that outlives the job (the working dir is temporary).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from rl.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", ".git", "runs", ".cache", "**/__pycache__", "*.egg-info"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _use_local_auth_token() -> None:
    """Recent Ray clusters require a token; use the local one (``~/.ray/auth_token``) when there is one."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # older Ray: no token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def submit(recipe: str, overrides: list[str], address: str, wait: bool = True, timeout_s: float = 24 * 3600,
           python: str = "python") -> tuple[str, str]:
    """Submit; with ``wait``, stream the job's logs until it ends. Returns (job id, final status).

    ``python`` is the interpreter on the cluster that has this project's dependencies.
    """
    from ray.job_submission import JobSubmissionClient

    load_recipe(recipe, overrides, check_paths=False)
    _use_local_auth_token()
    recipe_arg = str(Path(recipe).resolve().relative_to(ROOT)) if Path(recipe).resolve().is_relative_to(ROOT) else recipe
    entrypoint = " ".join([shlex.quote(python), "-m", "rl.cli", "train", shlex.quote(recipe_arg), *map(shlex.quote, overrides)])
    give_up = time.time() + 180  # a freshly started head needs a few seconds before its job agent answers
    while True:
        try:
            client = JobSubmissionClient(address)
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                metadata={"recipe": recipe_arg},
            )
            break
        except (RuntimeError, ConnectionError) as e:
            if not (isinstance(e, ConnectionError) or "No available agent" in str(e)) or time.time() > give_up:
                raise
            time.sleep(2.0)
    print(f"[rl] submitted {job_id} to {address}: {entrypoint}", flush=True)
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    printed, deadline = 0, time.time() + timeout_s
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        if status in TERMINAL or time.time() > deadline:
            print(f"[rl] job {job_id}: {status}", flush=True)
            return job_id, status
        time.sleep(2.0)
