"""Encoders built by name: MLP and convolutional autoencoders, VAE (and later GAN, DEC/IDEC heads)."""

from engine.models import autoencoder, conv_autoencoder, vae  # noqa: F401  (register mlp_ae, conv_ae, vae)
from engine.models.autoencoder import MLPAutoencoder, MLPAutoencoderConfig
from engine.models.conv_autoencoder import ConvAutoencoder, ConvAutoencoderConfig
from engine.models.registry import build_model, model_names, register_model
from engine.models.vae import VAE, VAEConfig

__all__ = ["VAE", "ConvAutoencoder", "ConvAutoencoderConfig", "MLPAutoencoder", "MLPAutoencoderConfig", "VAEConfig",
           "build_model", "model_names", "register_model"]
