"""Data for translation, in one direction (ARCHITECTURE.md, "One path for the data"). Imports no model code.

sources.split_sources          the data set's splits, random access (TFDS Ding / WMT14, or the copy task)
  ▸ tokenizer                  one SentencePiece model, trained once on a bounded random sample
  ▸ prepared                   ids in ArrayRecord files + every pair's lengths, encoded once, in parallel
  ▸ pipeline                   Grain: shuffle ▸ pack (packing) or bucket (batching) ▸ batch ▸ shard,
                               in threads or worker processes, with checkpointable state (epochs plans
                               each epoch's pairs, mixing in a second split at a ratio; assembly lays
                               each batch's planned pairs out in arrays)
  = datasets.build_datasets    what the training loop reads (``prepare`` runs the first three stages)

Optional training signal (issue 13, off by default): the Ding dictionary's entries mixed into the training pairs
(``data.lexicon_ratio``, ``ding_parser.lexicon_splits``), and both directions with target-language tags
(``data.bidirectional``; ``SourceEncoder`` encodes every source sentence, for training and for readers alike).
"""

from attn_jax.data.batching import Plan, bucket_boundaries
from attn_jax.data.copy_task import CopySource
from attn_jax.data.datasets import Datasets, Prepared, build_datasets, build_eval_datasets, prepare
from attn_jax.data.ding import (
    LEXICON_ENTRIES,
    DingEnDe,
    DingFileNotFoundError,
    ding_sources,
    fetch_ding_file,
    find_ding_file,
)
from attn_jax.data.ding_parser import DingPair, ParseStats, lexicon_splits, parse_ding, split_of, split_pairs
from attn_jax.data.encoding import BothDirections, TextPairEncoder, TokenPairEncoder
from attn_jax.data.epochs import epoch_pairs, extra_per_epoch
from attn_jax.data.packing import pack_rows, packed_row_lengths
from attn_jax.data.pipeline import Batches, PipelineConfig, PipelineStats, eval_batches, train_batches
from attn_jax.data.prepared import PreparedSplit, concatenate, encode_split, load_split
from attn_jax.data.sources import split_sources
from attn_jax.data.text import TEXT_ISSUES, DataError, clean_text
from attn_jax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    SourceEncoder,
    decode,
    encode,
    language_tags,
    load_or_train_tokenizer,
    load_run_tokenizer,
    load_tokenizer,
    sample_texts,
    train_tokenizer,
)
from attn_jax.data.wmt14 import wmt14_sources

__all__ = [
    "BOS_ID",
    "LEXICON_ENTRIES",
    "EOS_ID",
    "PAD_ID",
    "TEXT_ISSUES",
    "UNK_ID",
    "Batches",
    "BothDirections",
    "CopySource",
    "DataError",
    "Datasets",
    "DingEnDe",
    "DingFileNotFoundError",
    "DingPair",
    "ParseStats",
    "PipelineConfig",
    "PipelineStats",
    "Plan",
    "Prepared",
    "PreparedSplit",
    "SourceEncoder",
    "TextPairEncoder",
    "TokenPairEncoder",
    "bucket_boundaries",
    "build_datasets",
    "build_eval_datasets",
    "clean_text",
    "concatenate",
    "decode",
    "ding_sources",
    "encode",
    "encode_split",
    "epoch_pairs",
    "eval_batches",
    "extra_per_epoch",
    "fetch_ding_file",
    "find_ding_file",
    "language_tags",
    "lexicon_splits",
    "load_or_train_tokenizer",
    "load_run_tokenizer",
    "load_split",
    "load_tokenizer",
    "pack_rows",
    "packed_row_lengths",
    "parse_ding",
    "prepare",
    "sample_texts",
    "split_of",
    "split_pairs",
    "split_sources",
    "train_batches",
    "train_tokenizer",
    "wmt14_sources",
]
