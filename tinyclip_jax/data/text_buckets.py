"""Length-bucketed text: each batch's tokens cut to the smallest of a few static
lengths (`text_buckets`) that holds the batch's longest caption.

Exact: the text towers attend causally and pool at the end-of-text (EOT) token, so a
position after a row's EOT changes neither its pooled output nor any gradient; cutting
every position after the batch's last EOT changes nothing but float rounding. The
lengths are few and static so that the loop compiles one step per length, ahead.

The rule (`lengths`): text_buckets is None (the default: `DEFAULT`'s lengths below the
model's text context length, then the context length itself), () (off: every batch at
the context length) or strictly increasing positive lengths, none above the model's
text context length and the last equal to it (the bucket of a caption that fills the
context).

Several processes: each makes only its rows of the global batch, but all must build
the same shapes (a process that ran another bucket's step would leave the others
waiting in its collectives). `Agreement` takes the maximum of the processes' needed
lengths through the distributed runtime's key-value store (the coordinator's gRPC
service, which `jax.distributed` also uses for its barriers), never through a device
collective. That makes it safe on the prefetch thread, beside the main thread's
steps: device collectives must be issued in the same order on every process, and
one issued from a second thread could interleave differently with the step's on
each process; a key-value exchange issues none, and its keys name the batch, so the
order in which the processes reach them does not matter.
"""
from __future__ import annotations

import itertools
import threading
from typing import Sequence

import numpy as np

# The default's lengths for CLIP's 77-token context; shorter contexts keep those below.
DEFAULT = (16, 24, 32, 48, 77)


def check(buckets: Sequence[int] | None) -> tuple[int, ...] | None:
  """The lengths alone: None (the default), () or strictly increasing positive ints;
  ValueError if not."""
  if buckets is None:
    return None
  buckets = tuple(buckets)
  if (any(not isinstance(b, int) or isinstance(b, bool) or b <= 0 for b in buckets) or
      any(a >= b for a, b in zip(buckets, buckets[1:]))):
    raise ValueError(f"text_buckets {buckets} must be strictly increasing positive token "
                     "counts, e.g. (16, 24, 32, 48, 77); () turns bucketing off.")
  return buckets


def lengths(buckets: Sequence[int] | None, context_length: int) -> tuple[int, ...]:
  """The bucket lengths for a model with this context; ValueError naming the fault of
  an explicit list (the default, None, fits any context)."""
  buckets = check(buckets)
  if buckets is None:
    return tuple(b for b in DEFAULT if b < context_length) + (int(context_length),)
  if not buckets:
    return (int(context_length),)
  if buckets[-1] > context_length:
    raise ValueError(f"text_buckets {buckets} has lengths above the text context length "
                     f"{context_length}; use lengths up to {context_length}, the last equal "
                     "to it, or () to turn bucketing off.")
  if buckets[-1] != context_length:
    raise ValueError(f"text_buckets {buckets} leaves no bucket for captions of the full "
                     f"context length {context_length}; end the list with {context_length}.")
  return buckets


def needed(tokens: np.ndarray, eot: int) -> int:
  """Positions this batch's pooling reads: through each row's first EOT and its largest
  id (one position for tokenizer output, whose EOT is the vocabulary's largest id:
  either pooling rule then stays inside); a row without an EOT keeps every position."""
  tokens = np.asarray(tokens)
  n = tokens.shape[1]
  is_eot = tokens == eot
  first = np.where(is_eot.any(axis=1), is_eot.argmax(axis=1), n - 1)
  return int(np.maximum(first, tokens.argmax(axis=1)).max(initial=0)) + 1


def pick(buckets: Sequence[int], n: int) -> int:
  """The smallest bucket that holds n positions (the last holds any)."""
  return next((b for b in buckets if b >= n), buckets[-1])


class Closed(RuntimeError):
  """The agreement was closed while waiting for another process."""


_RUNS = itertools.count()  # every process makes the same agreements in the same order


class Agreement:
  """max over processes of a per-batch integer, batch by batch, through the distributed
  runtime's key-value store; a single process agrees with itself.

  Keys are "tinyclip/text_buckets/RUN/BATCH/PROCESS". A process deletes its key of
  batch i−1 once it has read every process's key of batch i: each process writes its
  key of batch i only after reading all of batch i−1's, so none is still needed."""

  POLL_MS = 1000

  def __init__(self):
    import jax  # pylint: disable=import-outside-toplevel
    self.count, self.index = jax.process_count(), jax.process_index()
    self.client = None
    if self.count > 1:
      from jax._src import distributed  # pylint: disable=import-outside-toplevel
      self.client = distributed.global_state.client
    self.prefix = f"tinyclip/text_buckets/{next(_RUNS)}"
    self.batch = 0
    self._closed = threading.Event()

  def max(self, value: int) -> int:
    if self.client is None:
      return int(value)
    key = lambda b, p: f"{self.prefix}/{b}/{p}"  # noqa: E731
    self.client.key_value_set(key(self.batch, self.index), str(int(value)))
    values = [self._get(key(self.batch, p)) for p in range(self.count)]
    if self.batch:
      self.client.key_value_delete(key(self.batch - 1, self.index))
    self.batch += 1
    return max(values)

  def _get(self, key: str) -> int:
    import jax  # pylint: disable=import-outside-toplevel
    while True:  # in slices, so that close() ends a wait for a process that stopped
      try:
        return int(self.client.blocking_key_value_get(key, self.POLL_MS))
      except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" not in str(e):
          raise
        if self._closed.is_set():
          raise Closed(f"stopped waiting for {key}: the input was closed.") from None

  def close(self) -> None:
    self._closed.set()


class Cut:
  """A host batch → the same batch with its tokens cut to the bucket that every
  process agreed on (the largest any process needs)."""

  def __init__(self, buckets: Sequence[int], eot: int | None = None):
    if eot is None:
      from tinyclip_jax import tokenizer  # pylint: disable=import-outside-toplevel
      eot = tokenizer.get_tokenizer().eot_token_id
    self.buckets, self.eot = tuple(buckets), int(eot)
    self.agreement = Agreement() if len(self.buckets) > 1 else None

  def __call__(self, batch: dict) -> dict:
    if self.agreement is None:
      return batch
    n = self.agreement.max(needed(batch["tokens"], self.eot))
    return dict(batch, tokens=np.ascontiguousarray(batch["tokens"][:, :pick(self.buckets, n)]))

  def close(self) -> None:
    if self.agreement is not None:
      self.agreement.close()
