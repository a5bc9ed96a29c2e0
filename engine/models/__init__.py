"""Encoders built by name: MLP autoencoder, ClusterGAN (and later conv AE, VAE, DEC/IDEC heads)."""

from engine.models import autoencoder, gan  # noqa: F401  (register mlp_ae, gan)
from engine.models.autoencoder import MLPAutoencoder, MLPAutoencoderConfig
from engine.models.gan import ClusterGAN, ClusterGANConfig
from engine.models.registry import build_model, model_names, register_model

__all__ = ["ClusterGAN", "ClusterGANConfig", "MLPAutoencoder", "MLPAutoencoderConfig", "build_model", "model_names",
           "register_model"]
