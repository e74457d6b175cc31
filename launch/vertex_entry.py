"""Container entry point on Vertex AI: JAX multi-host variables from CLUSTER_SPEC, then main.

`python launch/vertex_entry.py <flags of rrvf_jax.main>`. Vertex AI tells each replica of a
multi-replica job about the others only in the CLUSTER_SPEC JSON; rrvf_jax.sharding reads
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, so this sets them and execs main.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping

COORDINATOR_PORT = 1234  # Same as launch/xm_launch.py's COORDINATOR_PORT.


def _pool_number(name: str) -> int:
  match = re.fullmatch(r"workerpool(\d+)", name)
  if match is None:
    raise ValueError(f"CLUSTER_SPEC: unexpected worker pool name {name!r}")
  return int(match.group(1))


def jax_env(cluster_spec: str, port: int = COORDINATOR_PORT) -> dict[str, str]:
  """JAX_* variables for this replica from a Vertex AI CLUSTER_SPEC ({} for one replica)."""
  try:
    spec = json.loads(cluster_spec)
    cluster: Mapping[str, list[str]] = spec["cluster"]
    task_type, task_index = spec["task"]["type"], int(spec["task"]["index"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"CLUSTER_SPEC is not Vertex AI's cluster JSON: {e}") from None
  pools = sorted(cluster, key=_pool_number)
  world = sum(len(cluster[p]) for p in pools)
  if world <= 1:
    return {}
  if task_type not in cluster or not 0 <= task_index < len(cluster[task_type]):
    raise ValueError(f"CLUSTER_SPEC: task {task_type}[{task_index}] is not in the cluster")
  # Ranks run pool by pool, so workerpool0's single replica is process 0, the coordinator.
  rank = sum(len(cluster[p]) for p in pools[: pools.index(task_type)]) + task_index
  coordinator_host = cluster[pools[0]][0].rsplit(":", 1)[0]
  return {
    "JAX_COORDINATOR_ADDRESS": f"{coordinator_host}:{port}",
    "JAX_NUM_PROCESSES": str(world),
    "JAX_PROCESS_ID": str(rank),
  }


def main(argv: list[str]) -> None:
  """Sets the JAX_* variables (when CLUSTER_SPEC lists several replicas) and execs main."""
  spec = os.environ.get("CLUSTER_SPEC", "")
  try:
    os.environ.update(jax_env(spec) if spec else {})
  except ValueError as e:
    sys.exit(f"vertex_entry: error: {e}")
  os.execv(sys.executable, [sys.executable, "-m", "rrvf_jax.main", *argv[1:]])


if __name__ == "__main__":
  main(sys.argv)
