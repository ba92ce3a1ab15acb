"""Periodic evaluation during training, the loop's one entry into tinyclip_jax.eval:

  suite = Suite(config.eval, image_size, workdir)   # checks the tasks, loads embedded ones
  metrics = suite.run(model_config, params, mesh, step)   # every eval_every steps

The tasks are those of eval.tasks (tasks.py names them; `synthetic` is one like the
others). A task's metrics are named TASK/METRIC, except the generated split's, which
keep the names they had before eval.tasks took it in (`top1`, `top5`: the demo, the
notebook and the curves of existing runs read them).
"""
from __future__ import annotations

from tinyclip_jax.eval import tasks as tasks_lib
from tinyclip_jax.eval import zeroshot

KIND_RETIRED = ("eval.kind is gone; list the periodic evaluations in eval.tasks, where "
                "'synthetic' is a task like the others (eval.tasks='synthetic' does what "
                "eval.kind='synthetic' did; eval.tasks='' evaluates nothing).")
UNPREFIXED = "synthetic"


def check(config) -> list[str]:
  """The task names of an `eval` config section; ValueError (one sentence) on an
  unknown task or on the retired eval.kind."""
  if "kind" in config:
    raise ValueError(KIND_RETIRED)
  return tasks_lib.task_list(config.tasks)


class Suite:
  """The tasks of one run's `eval` section; embedded tasks are loaded once, here."""

  def __init__(self, config, image_size: int, workdir: str | None = None,
               appearance: dict | None = None):
    """appearance: the generated training data's (synthetic.appearance(config.data)), so
    that the synthetic task draws its images as the model saw them."""
    self.config = config
    self.tasks = check(config)
    self.workdir = workdir
    self._loaded = {t: zeroshot.load_task(t, image_size, config.num_examples,
                                          **(appearance or {}))
                    for t in self.tasks if tasks_lib.parse(t)[0] == "embedded"}

  def run(self, model_config, params, mesh=None, step: int | None = None) -> dict:
    """Every task's metrics for these params, in one flat dict; with a workdir and a
    step also written to WORKDIR/evals/step_NNNNNNNN.json."""
    c, out = self.config, {}
    size = model_config.vision.image_size
    if any(task.images.shape[1] != size for task in self._loaded.values()):
      raise ValueError(f"this suite's embedded tasks were loaded at another image size than "
                       f"the model's {size}; build a Suite for this model.")
    for t in self.tasks:
      metrics = tasks_lib.run(t, model_config, params, data_dir=c.data_dir, batch=c.batch_size,
                              max_examples=c.max_examples, num_examples=c.num_examples,
                              mesh=mesh, loaded=self._loaded.get(t))
      prefix = "" if t == UNPREFIXED else f"{t}/"
      out.update({prefix + k: v for k, v in metrics.items()})
    if self.workdir is not None and step is not None:
      tasks_lib.write_result(self.workdir, step, out)
    return out
