"""The bottom layer: small helpers that several layers need, importing no other package of this repository.

``rollout``, ``trainer``, ``rewards`` and ``adapters`` may not import ``rl`` (STYLE.md), ``rollout`` and ``trainer``
may not import each other, and ``rewards`` and ``adapters`` import no other layer; a helper that ``rl``, ``rollout``
and ``adapters`` all need can therefore live in none of them. It lives here, below them all. Only standard-library
code belongs here (a worker that imports it pays nothing), never anything about models, rollouts or training.

- ``common.atomic``: directories written whole or not at all (``atomic_directory``, ``fsync_dir``)
- ``common.registry``: short names for objects of one kind (``Registry``): rewards, environments, weight transports and
  the algorithms' math each keep one
"""
