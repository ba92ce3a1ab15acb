"""Where a run stands: python -m tinyclip_jax.status --config=FILE --workdir=DIR

Prints one line per phase of the run's plan (done, resumable from step N, or not
started) and exits 0 when the run is finished (every stage exported), 1 when it is
not (launch/tpu_vm.sh relaunch uses this to decide whether to take another slice),
2 on bad input.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:  # at run time: a library import must not define flags
  flags.DEFINE_string("workdir", None, "The run's workdir (local or gs://).")
  config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


def phases_status(config, workdir: str) -> list[tuple[str, str]]:
  """(phase name, state) for every phase of the run's plan."""
  from tinyclip_jax import checkpoint, paths, storage  # pylint: disable=import-outside-toplevel
  from tinyclip_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import plan as plan_lib  # pylint: disable=import-outside-toplevel
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
  out, latest = [], {}
  for p in plan_lib.plan(config, workdir):
    if p.workdir not in latest:
      mgr = checkpoint.manager(p.workdir, 1)
      latest[p.workdir] = mgr.latest_step()
      mgr.close()
    step = latest[p.workdir]
    stage_done = p.stage and storage.exists(workdir_lib.stage_done(p.workdir))
    exported = storage.exists(workdir_lib.final(p.workdir))
    if stage_done or (p.export and exported and step is not None and step >= p.last_step):
      state = "done"
    elif step is not None and step >= p.last_step and not p.export:
      state = "done"
    elif step is not None and step >= p.first_step:
      state = f"resumes from step {step}"
    else:
      state = "not started"
    out.append((p.name, state))
  return out


def main(argv) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}.", file=sys.stderr)
    return 2
  from tinyclip_jax.train import checks  # pylint: disable=import-outside-toplevel
  try:
    rows = phases_status(FLAGS.config, FLAGS.workdir)
  except checks.SetupError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, state in rows:
    print(f"{name}: {state}")
  return 0 if all(state == "done" for _, state in rows) else 1


if __name__ == "__main__":
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
