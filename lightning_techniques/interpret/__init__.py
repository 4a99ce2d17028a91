"""Interpretation loggers: attributions, Grad-CAM, SHAP, LIME, t-SNE, attention maps."""

__all__: list[str] = []

# --- attribution loggers (saliency, IG, DeepLIFT, Grad-CAM, SHAP, LIME) ---
from lightning_techniques.interpret.attribution import (  # noqa: E402
    DeepLiftLogger,
    IntegratedGradientsLogger,
    SaliencyLogger,
    completeness_report,
    deeplift,
    integrated_gradients,
    mass_fraction,
    saliency_map,
)
from lightning_techniques.interpret.gradcam import GradCAMLogger, grad_cam, resolve_target_layer  # noqa: E402
from lightning_techniques.interpret.shap_lime import (  # noqa: E402
    LIMELogger,
    SHAPLogger,
    deep_explainer_problems,
    lime_attributions,
    shap_attributions,
    superpixel_mask,
)

__all__ += [
    "DeepLiftLogger",
    "GradCAMLogger",
    "IntegratedGradientsLogger",
    "LIMELogger",
    "SHAPLogger",
    "SaliencyLogger",
    "completeness_report",
    "deep_explainer_problems",
    "deeplift",
    "grad_cam",
    "integrated_gradients",
    "lime_attributions",
    "mass_fraction",
    "resolve_target_layer",
    "saliency_map",
    "shap_attributions",
    "superpixel_mask",
]

# --- embeddings and attention (t-SNE, attention maps) ---
from lightning_techniques.interpret.attention import (  # noqa: E402
    AttentionCapture,
    AttentionMapLogger,
    attention_from_qk,
    attention_maps,
    find_attention_layers,
    plot_attention,
)
from lightning_techniques.interpret.tsne import TSNELogger, embeddings, knn_accuracy, tsne_embedding  # noqa: E402

__all__ += [
    "AttentionCapture",
    "AttentionMapLogger",
    "TSNELogger",
    "attention_from_qk",
    "attention_maps",
    "embeddings",
    "find_attention_layers",
    "knn_accuracy",
    "plot_attention",
    "tsne_embedding",
]
