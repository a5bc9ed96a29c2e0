"""Encoders built by name: MLP autoencoder, DEC/IDEC clustering heads (and later conv AE, VAE, GAN)."""

from engine.models import autoencoder, dec  # noqa: F401  (registers mlp_ae, dec, idec)
from engine.models.autoencoder import MLPAutoencoder, MLPAutoencoderConfig
from engine.models.dec import DEC, DECConfig
from engine.models.registry import build_model, model_names, register_model

__all__ = ["DEC", "DECConfig", "MLPAutoencoder", "MLPAutoencoderConfig", "build_model", "model_names",
           "register_model"]
