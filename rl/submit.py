"""``rl submit RECIPE [overrides] --address http://HEAD:8265``: run a recipe as a Ray Job;
``rl status|logs|stop JOB --address ...`` follow or stop it.

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


class JobsUnreachable(ConnectionError):
    """No Ray Jobs server answers at the address."""


def client(address: str, timeout_s: float = 30.0):
    """A Jobs client for ``address``; a clear error when nothing answers there (instead of a stack of retries)."""
    import urllib.error
    import urllib.request

    from ray.job_submission import JobSubmissionClient

    _use_local_auth_token()
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=5).read()
            break
        except urllib.error.HTTPError:
            break  # something answers: the client says what
        except (urllib.error.URLError, OSError) as e:
            if time.time() > deadline:
                raise JobsUnreachable(f"no Ray Jobs server answers at {address} ({getattr(e, 'reason', e)}): is the "
                                      "cluster's head up, and is this its dashboard address (ray start --head "
                                      "--include-dashboard=true, port 8265 by default)?") from None
            time.sleep(1.0)
    return JobSubmissionClient(address)


def job_status(address: str, job_id: str) -> str:
    return str(client(address).get_job_status(job_id)).split(".")[-1]


def job_logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def stop_job(address: str, job_id: str, timeout_s: float = 120.0) -> str:
    """Ask the job to stop (its run gets SIGTERM: a checkpoint is written) and wait until it has; returns its status."""
    c = client(address)
    c.stop_job(job_id)
    deadline = time.time() + timeout_s
    while (status := str(c.get_job_status(job_id)).split(".")[-1]) not in TERMINAL and time.time() < deadline:
        time.sleep(1.0)
    return status


def submit(recipe: str, overrides: list[str], address: str, wait: bool = True, timeout_s: float = 24 * 3600,
           python: str = "python") -> tuple[str, str]:
    """Submit; with ``wait``, stream the job's logs until it ends. Returns (job id, final status).

    ``python`` is the interpreter on the cluster that has this project's dependencies.
    """
    load_recipe(recipe, overrides, check_paths=False)
    jobs = client(address)
    recipe_arg = str(Path(recipe).resolve().relative_to(ROOT)) if Path(recipe).resolve().is_relative_to(ROOT) else recipe
    entrypoint = " ".join([shlex.quote(python), "-m", "rl.cli", "train", shlex.quote(recipe_arg), *map(shlex.quote, overrides)])
    give_up = time.time() + 180  # a freshly started head needs a few seconds before its job agent answers
    while True:
        try:
            job_id = jobs.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": {
                    "TOKENIZERS_PARALLELISM": "false",
                    # `rl stop` sends SIGTERM: give the run time to finish its step and checkpoint (Ray's default is 3 s).
                    "RAY_JOB_STOP_WAIT_TIME_S": "120"}},
                metadata={"recipe": recipe_arg},
            )
            break
        except (RuntimeError, ConnectionError) as e:
            if not (isinstance(e, ConnectionError) or "No available agent" in str(e)) or time.time() > give_up:
                raise
            time.sleep(2.0)
    print(f"[rl] submitted {job_id} to {address}: {entrypoint}", flush=True)
    if not wait:
        return job_id, job_status(address, job_id)
    printed, deadline = 0, time.time() + timeout_s
    while True:
        status = str(jobs.get_job_status(job_id)).split(".")[-1]
        logs = jobs.get_job_logs(job_id)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        if status in TERMINAL or time.time() > deadline:
            print(f"[rl] job {job_id}: {status}", flush=True)
            return job_id, status
        time.sleep(2.0)
