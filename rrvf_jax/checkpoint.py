"""Run checkpoints: the whole training state (sharded arrays + JSON metadata) via Orbax.

A checkpoint step holds two items: `state`, a pytree of (possibly sharded) jax arrays (parameters,
optimizer state, step, RNG key), and `meta`, JSON with the caller's metadata (data-iterator state,
...), the run config and its fingerprint. Saves are asynchronous; restores go straight into the
shardings of an abstract state. Resuming is re-running the same command: `restore_latest` finds
the newest step, and refuses a workdir that holds a different run's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from rrvf_jax.models.qwen_vl import params as params_lib

STATE_ITEM = "state"
META_ITEM = "meta"
_FORMAT = 1


class CheckpointError(RuntimeError):
  """A checkpoint directory exists but cannot be read (corrupt, incomplete or incompatible)."""


class ConfigMismatchError(ValueError):
  """The checkpoints in a workdir were written by a run with a different config."""


class Restored(NamedTuple):
  """What `Checkpointer.restore_latest` returns; unpacks as (step, state, metadata)."""

  step: int
  state: Any
  metadata: dict


# --- config fingerprint ------------------------------------------------------------------------


def config_to_dict(config: Any) -> dict:
  """Plain JSON-able dict of a ConfigDict / FrozenConfigDict / Mapping (tuples become lists)."""
  if config is None:
    return {}
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f"config must be a mapping or ConfigDict, got {type(config).__name__}")
  # The JSON round trip is what a checkpoint stores, so compare configs in that form.
  return json.loads(json.dumps(config, sort_keys=True, default=str))


def flatten_config(config: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'a.b': value} for every leaf of a nested dict."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      flat.update(flatten_config(value, name + "."))
    else:
      flat[name] = value
  return flat


def config_fingerprint(config: Any, ignore: Sequence[str] = ()) -> str:
  """Short stable hash of a config; dotted keys in `ignore` (and keys under them) do not count."""
  flat = flatten_config(config_to_dict(config))
  kept = {k: v for k, v in flat.items() if not _ignored(k, ignore)}
  blob = json.dumps(kept, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _ignored(key: str, ignore: Sequence[str]) -> bool:
  return any(key == p or key.startswith(p + ".") for p in ignore)


def config_diff(old: Any, new: Any, ignore: Sequence[str] = (), limit: int = 5) -> list[str]:
  """Up to `limit` lines 'key: old -> new' for keys whose values differ (sorted by key)."""
  a = flatten_config(config_to_dict(old))
  b = flatten_config(config_to_dict(new))
  missing = object()
  lines = []
  for key in sorted(set(a) | set(b)):
    if _ignored(key, ignore):
      continue
    va, vb = a.get(key, missing), b.get(key, missing)
    if va != vb:
      show = lambda v: "<absent>" if v is missing else _short(repr(v))
      lines.append(f"{key}: {show(va)} -> {show(vb)}")
  return (
    lines[:limit] if len(lines) <= limit else [*lines[:limit], f"... {len(lines) - limit} more"]
  )


def _short(text: str, n: int = 60) -> str:
  return text if len(text) <= n else text[: n - 3] + "..."


# --- abstract state ----------------------------------------------------------------------------


def abstract_like(state: Any) -> Any:
  """The abstract twin of a state (ShapeDtypeStruct leaves carrying each array's sharding)."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state
  )


# --- the checkpointer --------------------------------------------------------------------------


def _one_line(err: BaseException, n: int = 300) -> str:
  """'Type: message' squeezed onto one line and shortened (Orbax errors span many lines)."""
  return f"{type(err).__name__}: {_short(' '.join(str(err).split()), n)}"


class Checkpointer:
  """Orbax CheckpointManager for the run state: async saves every `save_every` steps, keep `keep`.

  Every process must call `save` / `restore_latest` / `wait` (Orbax synchronises hosts).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    save_every: int,
    keep: int | None = 3,
    config: Any = None,
    fingerprint_ignore: Sequence[str] = (),
    async_save: bool = True,
  ):
    """Opens (or creates) the checkpoint directory.

    Args:
      directory: where step folders live, e.g. `workdir/checkpoints`.
      save_every: `save` writes steps that are multiples of this (others need `force=True`).
      keep: how many newest steps to keep (None: all).
      config: the run config (ConfigDict or mapping); stored in every step, and a restore from a
        checkpoint whose config fingerprint differs is refused.
      fingerprint_ignore: dotted config keys that may change between attempts of one run
        (e.g. logging frequency); they are left out of the fingerprint.
      async_save: write in a background thread (`save` returns once arrays are copied to host).
    """
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None, got {keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = int(save_every)
    self.fingerprint_ignore = tuple(fingerprint_ignore)
    self.config = None if config is None else config_to_dict(config)
    self.fingerprint = (
      None if config is None else config_fingerprint(self.config, self.fingerprint_ignore)
    )
    every = self.save_every
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      # Multiples of save_every only (Orbax would also save the first step it sees).
      should_save_fn=lambda step, _last: step % every == 0,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # leftovers of a save interrupted by a crash
      create=True,
    )
    try:
      self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE_ITEM, META_ITEM)
      )
    except Exception as e:
      raise CheckpointError(
        f"cannot open checkpoint directory {self.directory}: {_one_line(e)}"
      ) from e

  # Queries.

  def all_steps(self) -> list[int]:
    """Saved steps, ascending (finished saves only)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Newest saved step, or None."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` without force would write (a multiple of save_every, new)."""
    return self._manager.should_save(step)

  # Saving.

  def save(
    self, step: int, state: Any, metadata: Mapping | None = None, *, force: bool = False
  ) -> bool:
    """Starts saving `state` + `metadata` at `step` when due (or `force`); True if it saves.

    Returns once device arrays are copied to host, so the caller may then donate / overwrite
    them; writing continues in the background (see `wait`). A step already saved is skipped.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    if not force and not self._manager.should_save(step):
      return False
    payload = {
      "format": _FORMAT,
      "metadata": dict(metadata or {}),
      "config": self.config,
      "config_fingerprint": self.fingerprint,
    }
    try:
      json.dumps(payload)
    except (TypeError, ValueError) as e:
      raise ValueError(f"checkpoint metadata at step {step} is not JSON-serialisable: {e}") from e
    args = ocp.args.Composite(
      **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(payload)}
    )
    return bool(self._manager.save(step, args=args, force=force))

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written (and re-raises their errors)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # Restoring.

  def _read_meta(self, step: int) -> dict:
    """The JSON item of `step`; CheckpointError when unreadable."""
    try:
      restored = self._manager.restore(
        step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
      )
      meta = restored[META_ITEM]
    except Exception as e:
      raise self._unreadable(step, e) from e
    if not isinstance(meta, dict) or "metadata" not in meta:
      raise CheckpointError(
        f"checkpoint step {step} in {self.directory} has no run metadata; "
        "it was not written by rrvf_jax.checkpoint"
      )
    return meta

  def _unreadable(self, step: int, err: BaseException) -> CheckpointError:
    earlier = [s for s in self.all_steps() if s < step]
    hint = (
      f"; if it is damaged, delete {os.path.join(self.directory, str(step))} to resume from "
      f"step {earlier[-1]}"
      if earlier
      else ""
    )
    return CheckpointError(
      f"cannot read checkpoint step {step} in {self.directory} (corrupt, incomplete, or saved "
      f"with a different state structure): {_one_line(err)}{hint}"
    )

  def check_config(self, step: int, stored: Mapping) -> None:
    """Raises ConfigMismatchError when the stored config fingerprint differs from this run's."""
    old = stored.get("config_fingerprint")
    if self.fingerprint is None or old is None:
      return
    # Recompute with this run's ignore list, so changing the list does not break old checkpoints.
    old = config_fingerprint(stored.get("config") or {}, self.fingerprint_ignore)
    if old == self.fingerprint:
      return
    diff = config_diff(stored.get("config") or {}, self.config, self.fingerprint_ignore)
    raise ConfigMismatchError(
      f"{self.directory} holds checkpoints of a different run (step {step}, config fingerprint "
      f"{old} != {self.fingerprint}); differing keys: {'; '.join(diff)}. Use a new --workdir, or "
      "rerun with the original config to resume."
    )

  def restore(self, step: int, abstract_state: Any) -> Restored:
    """Restores `step` into the shapes, dtypes and shardings of `abstract_state`."""
    meta = self._read_meta(step)
    self.check_config(step, meta)
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}),
      )
      state = restored[STATE_ITEM]
    except Exception as e:
      raise self._unreadable(step, e) from e
    return Restored(step=step, state=state, metadata=meta["metadata"])

  def restore_latest(self, abstract_state: Any) -> Restored | None:
    """(step, state, metadata) of the newest checkpoint, or None when there is none.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings (see `abstract_like`);
    arrays are read straight into those shardings.
    """
    self._manager.reload()
    step = self._manager.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state)


# --- SIGTERM -----------------------------------------------------------------------------------


class StopRequest:
  """Set by SIGTERM; the training loop checks it, saves a final checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame) -> None:
    # Signal-safe: set plain attributes only; no I/O, locks or logging here. A second signal
    # gets the previous handler (by default: terminate), so a stuck loop can still be killed.
    self.requested = True
    self.signum = signum
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def should_stop(self, step: int | None = None) -> bool:
    """True once any process got the signal (or, multi-host, a JAX preemption sync point).

    With several processes every process must call this at the same steps: it is a collective.
    """
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    preempted = step is not None and ocp.multihost.reached_preemption(step)
    return bool(np.asarray(flags).any()) or bool(preempted)

  def uninstall(self) -> None:
    """Puts back the handlers that were there before `install_sigterm_handler`."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


def install_sigterm_handler(signals: Sequence[int] = (signal.SIGTERM,)) -> StopRequest:
  """Installs a handler that only records the signal; returns the StopRequest to poll.

  Typical loop:
    stop = install_sigterm_handler()
    for step in ...:
      ...
      ckpt.save(step, state, meta, force=stop.requested)
      if stop.requested: break
    ckpt.close()
  Must be called from the main thread (Python delivers signals there).
  """
  stop = StopRequest()
  for signum in signals:
    stop._previous[signum] = signal.getsignal(signum)
    signal.signal(signum, stop._handle)
  return stop


# --- export ------------------------------------------------------------------------------------


def export_hf(
  model: Any, path: str | os.PathLike, copy_from: str | os.PathLike | None = None
) -> None:
  """Writes the policy as a Hugging Face checkpoint (process 0 only) for serving / evaluation."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves):
    raise ValueError(
      "export_hf needs every parameter readable from process 0, but some are sharded across "
      "hosts; gather them first (jax.experimental.multihost_utils.process_allgather)"
    )
  if jax.process_index() == 0:
    params_lib.to_hf(model, path, copy_from=copy_from)
