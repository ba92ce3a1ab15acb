"""The demo's pictures' axes (tinyclip_jax/demo_figures.py), drawn from hand-made data."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tinyclip_jax import demo_figures as fig  # noqa: E402


def test_structure_panel_ticks_whole_layers():
  full = {t: {"width": 128, "heads": [4, 4, 4], "mlp": [512, 512, 512]} for t in ("visual", "text")}
  kept = {t: {"width": 98, "heads": [4, 2, 3], "mlp": [386, 239, 157]} for t in ("visual", "text")}
  f = plt.figure()
  fig.structure_panel(kept, full)(f, f.add_gridspec(1, 1)[0, 0])
  for ax in f.axes:
    assert list(ax.get_xticks()) == [0, 1, 2], ax.get_title()
    assert [b.get_height() for b in ax.patches] == [512, 512, 512, 386, 239, 157]
  assert [ax.get_title() for ax in f.axes] == [
      f"{t}: MLP units per layer (width 98/128, heads [4, 2, 3])" for t in ("visual", "text")]
  plt.close(f)


def test_curves_legend_says_which_rows_are_one_seed(tmp_path, monkeypatch):
  shown = {}
  monkeypatch.setattr(fig, "_save", lambda f, path: shown.setdefault(
      "legend", [t.get_text() for t in f.axes[0].get_legend().get_texts()]))
  h = [{"step": 2, "top1": 0.1}, {"step": 4, "top1": 0.2}]
  fig.curves(str(tmp_path / "top1.png"), {"distilled_s0": h, "distilled_s1": h,
                                          "inherit_clip_s0": h, "auto": h}, 0.5)
  assert shown["legend"] == ["auto", "distilled (inherit + affinity), mean of 2 seeds",
                             "inherit + CLIP loss (no affinity), seed 0", "teacher"]
