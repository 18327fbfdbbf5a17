"""Data: tokenizer utility, dataset formats, tokenisation and the grain pipeline."""
from gold_jax.data.config import default_data_config
from gold_jax.data.pipeline import build_dataset, iterator_state_from_json, iterator_state_to_json, make_iterator
from gold_jax.data.sources import load_rows
from gold_jax.data.tokenize import DatasetStats, tokenize_files
from gold_jax.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = ["DatasetStats", "build_dataset", "default_data_config", "iterator_state_from_json",
           "iterator_state_to_json", "load_rows", "load_tokenizer", "make_iterator", "tokenize_files",
           "train_tokenizer"]
