"""launch/colab_tpu_demo.ipynb runs top to bottom on CPU (TINYCLIP_NOTEBOOK_TINY=1:
tiny models, a few steps) in a real Jupyter kernel, so the notebook cannot rot; its install
cell's decision (what pip installs where) is checked case by case without running pip."""
from __future__ import annotations

import ast
import base64
import json
import os
import types
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_tpu_demo.ipynb"
PICTURES = ("top1.png", "guesses.png", "affinity.png")  # what the demo may draw


def _images(cell) -> list[bytes]:
  return [base64.b64decode(o["data"]["image/png"]) for o in cell.outputs
          if "image/png" in o.get("data", {})]


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
  # The kernel inherits this environment: this checkout's package, one CPU device.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TINYCLIP_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("TINYCLIP_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb,
      timeout=300,
      kernel_name="python3",
      resources={"metadata": {
          "path": str(ROOT / "launch")
      }})
  client.execute()  # raises CellExecutionError, with the cell's traceback, on any error

  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:80]
  text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
  assert f"tinyclip_jax from {ROOT / 'tinyclip_jax'}" in text  # not another install
  assert f"tinyclip_jax already imports from this clone ({ROOT}): not reinstalled" in text
  assert "CpuDevice" in text

  # Both top-5 plots were shown in the notebook and saved.
  plots = [c for c in code if "plot_top5(" in c.source and _images(c)]
  assert len(plots) == 2, [c.source[:60] for c in plots]
  assert (tmp_path / "top5_teacher.png").stat().st_size > 0
  assert (tmp_path / "top5_final.png").stat().st_size > 0

  # The teacher went through the converter; the distillation ran its steps and exported.
  assert (tmp_path / "teacher.safetensors").is_file() and (tmp_path / "teacher").is_dir()
  rows = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").open()]
  assert rows[-1]["step"] == 6 and "eval/top1" in rows[-1]
  assert (tmp_path / "distill" / "final").is_dir()

  # The demo ran its three stages (one seed) and drew its three pictures, all shown.
  demo = tmp_path / "demo"
  rows = json.loads((demo / "summary.json").read_text())["rows"]
  assert rows.keys() == {"teacher", "distilled_s0", "scratch_s0"}
  written = [n for n in PICTURES if (demo / n).is_file()]
  assert written == list(PICTURES)
  show = next(c for c in code if "display(Image(" in c.source)
  assert _images(show) == [(demo / n).read_bytes() for n in written]
  shown = "".join(o.get("text", "") for o in show.outputs)
  for n in set(PICTURES) - set(written):
    assert f"{n}: not written by this run (no {demo / n})" in shown



# ------------------------------------------------------------------ the install cell


@pytest.fixture(scope="module")
def install():
  """The install cell's functions, defined as the cell defines them, without its pip call."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cell = next(c for c in nb.cells if c.cell_type == "code" and 'TINYCLIP_SOURCE = ""' in c.source)
  tree = ast.parse(cell.source)
  tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) or
               (isinstance(n, ast.Import) and "tinyclip_jax" not in ast.unparse(n))]
  names = {}
  exec(compile(tree, str(NOTEBOOK), "exec"), names)  # pylint: disable=exec-used
  return types.SimpleNamespace(**names)


def _clone(root: Path, how: str = "setup.py", name: str = "tinyclip_jax") -> Path:
  (root / "launch").mkdir(parents=True)
  text = (f'setup(name="{name}")\n' if how == "setup.py" else f'[project]\nname = "{name}"\n')
  (root / how).write_text(text)
  return root


def _one_sentence(message: str) -> None:
  assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message


def test_install_a_wheel(install, tmp_path):
  wheel = tmp_path / "dist" / "tinyclip_jax-0.1.0-py3-none-any.whl"
  wheel.parent.mkdir()
  wheel.write_bytes(b"PK")
  for source in (str(wheel), "dist/" + wheel.name):  # absolute, or relative to the notebook
    args, what = install.install_plan(source, str(tmp_path), None, False)
    assert args == [str(wheel)] and str(wheel) in what
  args, _ = install.install_plan(str(wheel), str(tmp_path), None, True)
  assert args == [str(wheel), "jax[tpu]"]
  # A wheel is installed even where a clone or an installed copy is: the user asked for it.
  _clone(tmp_path / "repo")
  args, _ = install.install_plan(str(wheel), str(tmp_path / "repo" / "launch"),
                                 str(tmp_path / "repo" / "tinyclip_jax"), False)
  assert args == [str(wheel)]


@pytest.mark.parametrize("source", ["/content/missing.whl", "/content/tinyclip_jax.tar"])
def test_a_wheel_that_is_not_there_is_one_sentence(install, tmp_path, source):
  (tmp_path / "tinyclip_jax.tar").write_bytes(b"")
  with pytest.raises(ValueError) as e:
    install.install_plan(source, str(tmp_path), None, False)
  message = str(e.value)
  _one_sentence(message)
  assert f"TINYCLIP_SOURCE={source!r}" in message and "python -m build --wheel" in message
  assert "git+https://" in message


def test_install_a_git_url(install, tmp_path):
  url = "git+https://github.com/someone/tinyclip_jax.git@v0.1.0"
  assert install.install_plan(url, str(tmp_path), None, False)[0] == [url]
  assert install.install_plan(" " + url, str(tmp_path), None, True)[0] == [url, "jax[tpu]"]


@pytest.mark.parametrize("how", ["setup.py", "pyproject.toml"])
def test_inside_a_clone_it_is_installed_editable_once(install, tmp_path, how):
  repo = _clone(tmp_path / "repo", how)
  for cwd in (repo, repo / "launch"):
    args, what = install.install_plan("", str(cwd), None, False)
    assert args == ["-e", str(repo)] and "pip install -e" in what
  assert install.install_plan("", str(repo / "launch"), None, True)[0] == ["-e", str(repo),
                                                                           "jax[tpu]"]
  # Another copy importable: this clone is installed over it.
  other = str(tmp_path / "site-packages" / "tinyclip_jax")
  assert install.install_plan("", str(repo), other, False)[0] == ["-e", str(repo)]
  # Importable from this clone already: nothing to install (jax[tpu] on a TPU still).
  args, what = install.install_plan("", str(repo / "launch"), str(repo / "tinyclip_jax"), False)
  assert args is None and "not reinstalled" in what
  assert install.install_plan("", str(repo), str(repo / "tinyclip_jax"), True)[0] == ["jax[tpu]"]


def test_this_repository_is_a_clone(install):
  assert install.find_clone(str(ROOT / "launch")) == str(ROOT)


def test_nothing_to_install_from_is_one_sentence(install, tmp_path):
  _clone(tmp_path / "other", name="tinyclip_jax_fork")  # a project of another name is no clone
  for cwd in (tmp_path, tmp_path / "other" / "launch"):
    with pytest.raises(ValueError) as e:
      install.install_plan("", str(cwd), None, False)
    message = str(e.value)
    _one_sentence(message)
    assert message.startswith("TINYCLIP_SOURCE is empty")
    assert "wheel" in message and "python -m build --wheel" in message and "git+https://" in message
  # Already installed (an earlier run of the cell): used as it is.
  installed = str(tmp_path / "site-packages" / "tinyclip_jax")
  assert install.install_plan("", str(tmp_path), installed, False)[0] is None


def test_tpu_runtime_is_told_before_jax_is_imported(install):
  assert not install.on_tpu({}, [])
  assert not install.on_tpu({"COLAB_GPU": "1", "TPU_NAME": ""}, [])
  assert install.on_tpu({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, [])
  assert install.on_tpu({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, [])
  assert install.on_tpu({"TPU_NAME": "local"}, [])
  assert install.on_tpu({}, ["/dev/accel0"])
  assert install.on_tpu({}, ["/dev/vfio/0"])


def test_a_url_without_git_plus_is_one_sentence(install, tmp_path):
  url = "https://github.com/someone/tinyclip_jax.git"
  with pytest.raises(ValueError) as e:
    install.install_plan(" " + url + " ", str(tmp_path), None, False)
  message = str(e.value)
  _one_sentence(message)
  assert f"TINYCLIP_SOURCE={url!r} is a URL without git+" in message and f"git+{url}," in message
  wheel = "https://example.com/dist/tinyclip_jax-0.1.0-py3-none-any.whl"  # pip downloads it
  assert install.install_plan(wheel, str(tmp_path), None, True)[0] == [wheel, "jax[tpu]"]


def test_a_bare_git_plus_is_one_sentence_and_a_home_path_is_expanded(install, tmp_path,
                                                                      monkeypatch):
  with pytest.raises(ValueError) as e:
    install.install_plan("git+", str(tmp_path), None, False)
  _one_sentence(str(e.value))
  assert "TINYCLIP_SOURCE='git+' names no repository" in str(e.value)
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "tinyclip_jax-0.1.0-py3-none-any.whl").write_bytes(b"")
  args, _ = install.install_plan("~/tinyclip_jax-0.1.0-py3-none-any.whl", "/", None, False)
  assert args == [str(tmp_path / "tinyclip_jax-0.1.0-py3-none-any.whl")]
