"""Figures a reader can read: labelled attribution grids, attention maps with axes, importance with error bars,
reliability diagrams with counts."""

from __future__ import annotations

import pytest
import torch

from lightning_techniques.interpret.attribution import plot_attributions


def _colorbars(fig) -> int:
    return sum(getattr(ax, "_colorbar", None) is not None for ax in fig.axes)


def _plots(fig) -> list:
    return [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is None]


def test_attribution_grid_names_class_prediction_confidence_and_has_a_colorbar() -> None:
    torch.manual_seed(0)
    x, a = torch.rand(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    fig = plot_attributions(x, a, [3, 1, 7], [3, 2, 7], [0.91, 0.55, 0.8], class_names=[f"c{i}" for i in range(10)],
                            title="saliency")
    grid = _plots(fig)
    captions = [t.get_text() for ax in grid for t in ax.get_xticklabels()]
    assert captions == ["true c3\npred c3 (91%)", "true c1\npred c2 (55%)", "true c7\npred c7 (80%)"]
    colours = [t.get_color() for ax in grid for t in ax.get_xticklabels()]
    assert colours == ["black", "tab:red", "black"]  # a misclassified sample stands out
    assert [t.get_text() for t in grid[0].get_yticklabels()] == ["input", "attribution"]
    assert _colorbars(fig) == 1 and fig.texts[0].get_text() == "saliency"  # the suptitle
    width, height = fig.get_size_inches()
    assert width >= 5 and height >= 3  # readable at dpi 100
    # many samples wrap into rows of 8 (a coarse Grad-CAM map is upsampled to the input)
    fig = plot_attributions(torch.rand(10, 1, 8, 8), torch.rand(10, 1, 2, 2), [0] * 10, [0] * 10, [0.5] * 10)
    grid = _plots(fig)
    assert [len(ax.get_xticklabels()) for ax in grid] == [8, 2] and _colorbars(fig) == 1
    # tabular: samples x features, labelled rows, signed colorbar
    fig = plot_attributions(torch.rand(2, 5), torch.randn(2, 5), [0, 1], [1, 1], [0.6, 0.7])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["true 0 / pred 1 (60%)", "true 1 / pred 1 (70%)"]
    assert ax.get_xlabel() == "input feature" and _colorbars(fig) == 1


def test_attention_logger_labels_axes_with_the_samples_tokens() -> None:
    from lightning_techniques.interpret import AttentionMapLogger

    logger = AttentionMapLogger(token_names=["[PAD]", "a", "b", "c"])
    assert logger.style == "figure"  # the default is the readable figure
    ids = torch.tensor([[1, 2, 3, 0], [3, 3, 1, 9]])
    assert logger._tokens({"input_ids": ids, "labels": torch.tensor([0, 1])}, 2) == [
        ["a", "b", "c", "[PAD]"], ["c", "c", "a", "9"]]
    assert logger._tokens((torch.rand(2, 4, 8), torch.tensor([0, 1])), 2) is None  # no ids: positions
    with pytest.raises(TypeError, match="token_names"):
        AttentionMapLogger(token_names="abc")


def _png_size(path) -> tuple[int, int]:
    import struct

    with open(path, "rb") as fh:
        header = fh.read(24)
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("figure", [True, False])
def test_logger_writes_the_labelled_figure_or_the_cheap_image(tmp_path, figure: bool) -> None:
    import lightning as L

    from lightning_techniques.demo import DigitsCNN, DigitsDataModule
    from lightning_techniques.interpret import GradCAMLogger

    logger = GradCAMLogger(every_n_val_epochs=1, max_samples=10, figure=figure, log_on_test=False)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=[logger])
    trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule())
    (png,) = (tmp_path / "artifacts" / "gradcam" / "val").glob("overlay_step*.png")
    width, height = _png_size(png)
    if figure:  # titles, row names and a colorbar around the grid
        assert width > 1000 and height > 250
    else:  # the bare grid: 10 tiles of 8x8 pixels enlarged 8x, two rows
        assert (width, height) == (10 * (64 + 2) + 2, 2 * 64 + 3 * 2)
