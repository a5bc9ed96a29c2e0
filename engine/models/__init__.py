"""Encoders built by name: MLP and convolutional autoencoders, VAE, VaDE, ClusterGAN, and DEC/IDEC clustering heads."""

from engine.models import autoencoder, conv_autoencoder, dec, gan, vade, vae  # noqa: F401  (register every model)
from engine.models.autoencoder import MLPAutoencoder, MLPAutoencoderConfig
from engine.models.conv_autoencoder import ConvAutoencoder, ConvAutoencoderConfig
from engine.models.dec import DEC, DECConfig
from engine.models.gan import ClusterGAN, ClusterGANConfig
from engine.models.registry import build_model, model_names, register_model
from engine.models.vade import VaDE, VaDEConfig
from engine.models.vae import VAE, VAEConfig

__all__ = ["DEC", "VAE", "ClusterGAN", "ClusterGANConfig", "ConvAutoencoder", "ConvAutoencoderConfig", "DECConfig",
           "MLPAutoencoder",
           "MLPAutoencoderConfig", "VAEConfig", "VaDE", "VaDEConfig", "build_model", "model_names", "register_model"]
