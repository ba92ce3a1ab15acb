"""Zero-shot classification and image–text retrieval of a model checkpoint.

Standalone: python -m tinyclip_jax.evaluate --checkpoint=DIR --dataset=TASK [--data_dir=D]
TASK: synthetic; folder:PATH (images + labels.json, as `python -m tinyclip_jax.data.synthetic`
writes); zero-shot on TFDS imagenet2012, imagenet_v2, cifar10, cifar100; retrieval on TFDS
coco_captions or webdataset shards wds:PATTERN; NAME:SPLIT picks a split; several
comma-separated. The tasks themselves are in tinyclip_jax/eval/.
"""
from __future__ import annotations

import json
import os
import sys

from tinyclip_jax import cli, paths


def main(argv=None) -> int:
  p = cli.Parser(prog="python -m tinyclip_jax.evaluate", description=__doc__,
                 usage_line="python -m tinyclip_jax.evaluate --checkpoint=DIR "
                 "[--dataset=TASK[,TASK...]] [--data_dir=DIR] [--num_examples=N] "
                 "[--max_examples=N] [--output=FILE]")
  p.add_argument("--checkpoint", required=True, type=paths.resolve, help="flax model folder")
  p.add_argument("--dataset", default="synthetic", type=paths.resolve_tasks,
                 help="task(s), comma-separated")
  p.add_argument("--data_dir", default="", type=paths.resolve,
                 help="TFDS data_dir of the datasets")
  p.add_argument("--num_examples", type=int, default=512, help="size of the synthetic task")
  p.add_argument("--max_examples", type=int, default=0, help="per TFDS/wds task; 0 = all")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--output", default="", type=paths.resolve,
                 help="write the metrics as JSON here")
  return cli.run_main(lambda a: _run(p.parse_args(a)), argv)


def _run(args) -> dict:
  # Imported here: --help and argument errors answer without loading JAX.
  import jax  # pylint: disable=import-outside-toplevel
  from tinyclip_jax import model_io, parallel  # pylint: disable=import-outside-toplevel
  from tinyclip_jax.eval import tasks  # pylint: disable=import-outside-toplevel
  names = tasks.task_list(args.dataset)  # unknown names fail before the model loads
  if not names:
    raise cli.UsageError("--dataset is empty; name at least one task.")
  params, config = model_io.load_model(args.checkpoint)
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})  # batches over all devices
  params = jax.device_put(params, parallel.replicated(mesh))
  results = {t: tasks.run(t, config, params, data_dir=args.data_dir, batch=args.batch_size,
                          max_examples=args.max_examples, num_examples=args.num_examples,
                          mesh=mesh)
             for t in names}
  metrics = results[names[0]] if len(names) == 1 else results
  print(json.dumps(metrics))
  if args.output:
    from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
    storage.write_json(args.output, metrics)  # atomic, local or gs://
  return metrics


if __name__ == "__main__":
  sys.exit(main())
