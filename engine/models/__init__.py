"""Encoders built by name: MLP autoencoder (and later conv AE, VAE, GAN, DEC/IDEC heads)."""

from engine.models import autoencoder  # noqa: F401  (registers mlp_ae)
from engine.models.autoencoder import MLPAutoencoder, MLPAutoencoderConfig
from engine.models.registry import build_model, model_names, register_model

__all__ = ["MLPAutoencoder", "MLPAutoencoderConfig", "build_model", "model_names", "register_model"]
