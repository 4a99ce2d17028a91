"""Interpretation loggers: attributions, Grad-CAM, SHAP, LIME, t-SNE, attention maps."""

__all__: list[str] = []

# --- attribution loggers (saliency, IG, DeepLIFT, Grad-CAM, SHAP, LIME) ---

# --- embeddings and attention (t-SNE, attention maps) ---
