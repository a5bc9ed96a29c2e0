"""Cluster-balanced sampling (Vo et al. 2024): hierarchical k-means with resampling, then balanced draws."""


def sample(*args, **kwargs):
    raise NotImplementedError
