"""Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
ICCV 2017) as a functional core (Captum's ``LayerGradCam`` + ``LayerAttribution.interpolate``) and a logger."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn

from lightning_techniques._internal.eval_grad import gradients_enabled, usable_tensor
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice
from lightning_techniques.interpret.attribution import AttributionLogger, Explain, Selection, _target_list

InterpolateMode = Literal["bilinear", "nearest", "bicubic", "area"]
INTERPOLATION = ("bilinear", "nearest", "bicubic", "area")


def conv_layers(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Conv2d`` of ``model``, in registration order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resolve_target_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the Grad-CAM layer: ``layer`` by qualified name, or the last ``nn.Conv2d``.

    Raises:
        ValueError: naming the missing layer and listing the conv layers (or saying there are none).
    """
    convs = conv_layers(model)
    if layer is None:
        if not convs:
            kinds = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                f"Grad-CAM found no nn.Conv2d layer in {type(model).__name__} (module types: {kinds}); pass "
                "target_layer=<qualified name> of a layer with a spatial [B, C, H, W] output."
            )
        layer = convs[-1]
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        raise ValueError(f"Grad-CAM target_layer={layer!r} is not a layer of {type(model).__name__}; conv layers: {convs}")
    return layer, modules[layer]


def grad_cam(
    model: nn.Module,
    layer: nn.Module,
    inputs: Tensor,
    target: Tensor | Sequence[int] | int,
    upsample: bool = True,
    interpolate_mode: InterpolateMode = "bilinear",
    relu: bool = True,
) -> Tensor:
    """Grad-CAM maps ``[B, 1, h, w]`` of ``layer`` for the ``target`` classes; with ``upsample`` resized to the
    input's ``H x W``.

    ``cam = ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of ``d y_c / d A_k`` (the paper's eq. 1-2).
    Works inside ``torch.inference_mode``; the model's modes and flags are restored.
    """
    attr = require("captum.attr", "interpret", "grad_cam")
    check_choice("interpolate_mode", interpolate_mode, INTERPOLATION)
    with gradients_enabled(model):
        x = usable_tensor(inputs)
        cam = attr.LayerGradCam(model, layer).attribute(x, target=_target_list(target, len(x)), relu_attributions=relu)
        if cam.ndim != 4:
            raise ValueError(
                f"Grad-CAM needs a layer with a spatial [B, C, H, W] output; {type(layer).__name__} gave shape "
                f"{tuple(cam.shape)}."
            )
        if upsample and x.ndim == 4:
            cam = attr.LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode)
    return cam.detach()


class GradCAMLogger(AttributionLogger):
    """Logs Grad-CAM heatmaps (upsampled, overlaid on the input) of a fixed set of samples during training.

    Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra, "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017 (Captum's ``LayerGradCam`` + ``LayerAttribution.interpolate``). The
    target layer is given by qualified name or, by default, the last ``nn.Conv2d`` of the module; a name that does
    not exist fails in ``setup`` (before the first step) listing the conv layers.

    Args:
        target_layer: qualified module name (e.g. ``"features.5"``); None = the last ``nn.Conv2d``.
        interpolate_mode: how the coarse map is upsampled to the input (``bilinear``, ``nearest``, ``bicubic``,
            ``area``).
        every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed, name,
            input_key, target_key, class_names, figure, every_n_epochs (deprecated), log:
            as for :class:`~lightning_techniques.interpret.attribution.AttributionLogger`.

    Example::

        trainer = L.Trainer(callbacks=[GradCAMLogger(target_layer="features.5", every_n_val_epochs=5)])
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())   # <log_dir>/artifacts/gradcam/val/overlay_*.png

    Limits: image models ([B, C, H, W] inputs, a layer with a spatial output); the maps are as coarse as the layer;
    rank 0 only under DDP; FSDP/DeepSpeed refused.
    """

    method_name = "gradcam"
    default_every_n_val_epochs = 2

    def __init__(self, target_layer: str | None = None, interpolate_mode: InterpolateMode = "bilinear", every_n_val_epochs: int | None = None,
                 selection: Selection = "per_class", samples_per_class: int = 1, max_samples: int = 10,
                 explain: Explain = "prediction", log_on_test: bool = True, seed: int = 0, name: str | None = None,
                 input_key: str | int | None = None, target_key: str | int | None = None,
                 class_names: list[str] | None = None, figure: bool = True,
                 every_n_epochs: int | None = None, log: bool = True) -> None:
        super().__init__(every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed,
                         name, input_key, target_key, class_names, figure, every_n_epochs, log)
        if target_layer is not None and (not isinstance(target_layer, str) or not target_layer):
            raise ValueError(f"target_layer must be a qualified module name or None, got {target_layer!r}.")
        check_choice("interpolate_mode", interpolate_mode, INTERPOLATION)
        require("captum.attr", "interpret", "GradCAMLogger")
        self.target_layer = target_layer
        self.interpolate_mode = interpolate_mode
        self.resolved_layer: str | None = None

    def check_model(self, trainer: Any, pl_module: Any) -> None:
        self.resolved_layer, _ = resolve_target_layer(pl_module, self.target_layer)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Tensor, trainer: Any) -> tuple[Tensor, dict[str, Any]]:
        name, layer = resolve_target_layer(model, self.target_layer)
        self.resolved_layer = name
        if inputs.ndim != 4:
            raise ValueError(f"GradCAMLogger needs image inputs [B, C, H, W]; got shape {tuple(inputs.shape)}.")
        cam = grad_cam(model, layer, inputs, target, upsample=True, interpolate_mode=self.interpolate_mode)
        return cam, {"layer": name, "cam_zero_fraction": float((cam.flatten(1).amax(1) <= 0).float().mean())}

