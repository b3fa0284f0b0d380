"""Data for translation: TFDS builders and sources, a shared SentencePiece vocabulary, Grain batches.

Imports no model code. The path of the data (see ARCHITECTURE.md, "One path for the data"):

    ding_sources / wmt14_sources / CopySource      random-access examples per split
      ▸ load_or_train_tokenizer                    shared SentencePiece model in the workdir
      ▸ train_batches / eval_batches               tokenize ▸ filter ▸ bucket ▸ batch ▸ shard, via Grain
"""

from attn_jax.data.batching import bucket_boundaries
from attn_jax.data.copy_task import CopySource
from attn_jax.data.ding import DingEnDe, DingFileNotFoundError, ding_sources, fetch_ding_file, find_ding_file
from attn_jax.data.ding_parser import DingPair, ParseStats, parse_ding, split_of, split_pairs
from attn_jax.data.encoding import load_or_measure_lengths, measure_lengths, text_pair_encoder, token_pair_encoder
from attn_jax.data.pipeline import Batches, PipelineConfig, PipelineStats, eval_batches, train_batches
from attn_jax.data.text import TEXT_ISSUES, DataError, clean_text
from attn_jax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    decode,
    encode,
    load_or_train_tokenizer,
    load_tokenizer,
    train_tokenizer,
    training_texts,
)
from attn_jax.data.wmt14 import wmt14_sources

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "TEXT_ISSUES",
    "UNK_ID",
    "Batches",
    "CopySource",
    "DataError",
    "DingEnDe",
    "DingFileNotFoundError",
    "DingPair",
    "ParseStats",
    "PipelineConfig",
    "PipelineStats",
    "bucket_boundaries",
    "clean_text",
    "decode",
    "ding_sources",
    "encode",
    "eval_batches",
    "fetch_ding_file",
    "find_ding_file",
    "load_or_measure_lengths",
    "load_or_train_tokenizer",
    "load_tokenizer",
    "measure_lengths",
    "parse_ding",
    "split_of",
    "split_pairs",
    "text_pair_encoder",
    "token_pair_encoder",
    "train_batches",
    "train_tokenizer",
    "training_texts",
    "wmt14_sources",
]
