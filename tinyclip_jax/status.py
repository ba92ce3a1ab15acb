"""Where a run stands: python -m tinyclip_jax.status --config=FILE --workdir=DIR

Prints one line per phase of the run's plan (done, resumable from step N, or not
started) and exits 0 when the run is finished (every stage exported), 1 when it is
not (launch/tpu_vm.sh relaunch uses this to decide whether to take another slice),
2 on bad input (one sentence, as the trainer's CLI).
"""
from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS


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
    final = workdir_lib.final(p.workdir)
    # A gs:// export is trusted only with its commit marker (a local one is renamed
    # into place whole).
    exported = storage.exists(final) and (not storage.is_url(final) or
                                          storage.is_published(final))
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
  from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.train import checks  # pylint: disable=import-outside-toplevel
  try:
    rows = phases_status(FLAGS.config, FLAGS.workdir)
  except (checks.SetupError, storage.StorageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, state in rows:
    print(f"{name}: {state}")
  return 0 if all(state == "done" for _, state in rows) else 1


if __name__ == "__main__":
  # The trainer's --config/--workdir flags and its parsing: a bad flag or config field
  # is one sentence and exit 2 here too.
  from tinyclip_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=main_lib.parse_flags)
