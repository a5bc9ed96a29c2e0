"""Data curation on embeddings: semantic deduplication and cluster-balanced sampling, out of core on Ray."""

from engine.curate.dedup import DEFAULT_SUMMARY_EPS, dedup
from engine.curate.sample import sample
from engine.curate.similarity import KEEP_MODES, greedy_dedup
from engine.curate.source import Embeddings, open_embeddings

__all__ = ["DEFAULT_SUMMARY_EPS", "KEEP_MODES", "Embeddings", "dedup", "greedy_dedup", "open_embeddings", "sample"]
