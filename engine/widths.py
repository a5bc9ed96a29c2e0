"""The default layer widths of the engine's MLP encoders, read by the config and the models (no imports)."""

# DEC's encoder, d-500-500-2000-latent (Xie et al. 2016), kept by IDEC, N2D and VaDE; the decoder mirrors it.
MLP_HIDDEN = (500, 500, 2000)
