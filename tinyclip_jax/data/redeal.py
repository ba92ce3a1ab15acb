"""Resuming sharded input on another number of processes: the unread rest of the
interrupted epochs, window by window, dealt to the new processes.

The rule. A checkpoint holds one position per process of the run that saved it:
(epoch, window, offset) in that process's own deal of the shards (shards.host_units),
and maybe a `tail` (below). Let E be the first epoch none of them has started. The
work left before E is, for every old process, the window it is in from its offset
on, then its other windows up to E — each a *piece* [count, index, epoch, window,
offset]: window `window` of epoch `epoch` of process `index` of `count`, from record
`offset` on. A window's records are a pure function of (seed, epoch, window, its
shards) (see sharded.py), so a piece is read exactly as the old process would have
read it, crops included. The pieces, sorted by (epoch, window, count, index), are
dealt round-robin to the new processes, which read their pieces (the `tail` of their
state) and then the normal deal for the new count from epoch E, window 0. So every
sample of every epoch is used exactly once, as without a resize; what a resize
costs is reading (not decoding) again the records before the offsets of the partly
read windows. The skipped counts and the used total of all old processes go to new
process 0, so the totals over processes stay exact. A checkpoint saved while tails
are being read holds them, so it resumes on yet another count the same way. The
states of a resized run say so (`resized`) from then on: its batches are no longer
those of a run that never changed its count (which a teacher cache replays).
"""
from __future__ import annotations

from tinyclip_jax.data import shards

_FIELDS = ("epoch", "window", "offset")


def is_position(state: dict) -> bool:
  """Whether `state` is a sharded source's position (not the synthetic source's)."""
  return isinstance(state, dict) and all(f in state for f in _FIELDS)


def windows_per_epoch(n_units: int, per_window: int, count: int, index: int) -> int:
  """Windows of process `index` of `count` in every epoch: it holds units index,
  index + count, ... of the epoch's permutation (shards.host_units)."""
  mine = len(range(index, n_units, count))
  return -(-mine // per_window)


def end_epoch(hosts: list) -> int:
  """E: the first epoch no process has started. A position at window 0, offset 0 has
  read nothing of its epoch (a fresh run's, or that of a process still reading its
  tail, whose pieces all lie before that epoch)."""
  started = lambda h: int(h["window"]) > 0 or int(h["offset"]) > 0
  return max(int(h["epoch"]) + started(h) for h in hosts)


def _check(piece: list, n_units: int, per_window: int) -> None:
  count, index, epoch, window, _ = piece
  if not (0 <= index < count <= n_units and epoch >= 0 and
          0 <= window < windows_per_epoch(n_units, per_window, count, index)):
    raise shards.DataError(
        f"the checkpoint's input position names window {window} of epoch {epoch} of "
        f"process {index} of {count}, which data.train's {n_units} shard(s) in windows "
        f"of data.shards_per_window={per_window} do not have; resume with the data the "
        "run was started on, or start a new workdir.")


def pieces(hosts: list, n_units: int, per_window: int) -> list[list]:
  """The unread rest, before epoch E, of every old process's stream, sorted."""
  if not all(is_position(h) for h in hosts):
    raise shards.DataError("the checkpoint's input position is not one of sharded input "
                           "(epoch, window, offset) for every process; resume with the data "
                           "config that saved it, or start a new workdir.")
  stop, count, out = end_epoch(hosts), len(hosts), []
  for index, h in enumerate(hosts):
    out += [[int(v) for v in p] for p in h.get("tail", [])]
    e, w, o = (int(h[f]) for f in _FIELDS)
    _check([count, index, e, w, o], n_units, per_window)
    n = windows_per_epoch(n_units, per_window, count, index)
    for epoch in range(e, stop):
      out += [[count, index, epoch, win, o if (epoch, win) == (e, w) else 0]
              for win in range(w if epoch == e else 0, n)]
  for p in out:
    _check(p, n_units, per_window)
  return sorted(out, key=lambda p: (p[2], p[3], p[0], p[1]))


def resized_state(hosts: list, process_index: int, process_count: int, n_units: int,
                  per_window: int) -> dict:
  """The state of process `process_index` of `process_count` resuming `hosts`' positions."""
  tail = pieces(hosts, n_units, per_window)[process_index::process_count]
  skipped = {r: 0 for r in shards.REASONS}
  used = 0
  if process_index == 0:
    for h in hosts:
      used += int(h.get("used", 0))
      for r, n in h.get("skipped", {}).items():
        skipped[r] = skipped.get(r, 0) + int(n)
  stop = end_epoch(hosts)
  state = {"epoch": stop, "window": 0, "offset": 0, "used": used, "skipped": skipped}
  if stop > 0 or any(h.get("resized") for h in hosts):  # else nothing was read: a fresh start
    state["resized"] = True
  return dict(state, tail=tail) if tail else state


def summary(hosts: list, process_count: int, n_units: int, per_window: int) -> str:
  """One line for the log: what a resize re-deals."""
  all_pieces = pieces(hosts, n_units, per_window)
  stop = end_epoch(hosts)
  head = (f"the input position was saved by {len(hosts)} processes and this run has "
          f"{process_count}: ")
  if not all_pieces:
    return head + f"no process had started epoch {stop}, which is dealt to all {process_count}."
  partly = sum(1 for p in all_pieces if p[4])
  return head + (
      f"the unread rest of epoch(s) {all_pieces[0][2]}..{stop - 1} ({len(all_pieces)} "
      f"window(s) of the old deal, {partly} partly read: their read records are read again "
      f"and passed over) is dealt to the {process_count} process(es), then epoch {stop} on "
      f"to all {process_count}; no sample is repeated or left out.")
