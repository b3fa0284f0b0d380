"""WMT 2014 English-German (paper §5.1: "about 4.5 million sentence pairs"; newstest2013 for development,
newstest2014 for the reported BLEU), through TFDS's own ``wmt14_translate/de-en`` builder.

TFDS prepares it once (downloading about 1.5 GB) as ArrayRecord, then ``tfds.data_source`` reads it
without TensorFlow. Splits: ``train`` (Europarl v7, Common Crawl, News Commentary v9), ``validation``
(newstest2013), ``test`` (newstest2014); items are ``{"en": bytes, "de": bytes}``.
"""

import os
from collections.abc import Mapping

import grain
import tensorflow_datasets as tfds

# Without TensorFlow, TFDS cannot import its `translate` package as a whole (a sibling package needs TF),
# so `wmt14_translate` is unregistered until its own module is imported.
import tensorflow_datasets.translate.wmt14  # noqa: F401

WMT14_NAME = "wmt14_translate/de-en"
WMT14_SPLITS = ("train", "validation", "test")


def wmt14_sources(
    data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> Mapping[str, grain.sources.RandomAccessDataSource]:
    """Random-access sources for the WMT14 en-de splits, preparing them on first use.

    Args:
      data_dir: TFDS data dir; ``None`` means TFDS's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      download: prepare the dataset when absent; if False it must already be there.

    Returns:
      ``{"train", "validation", "test"}`` to sources of ``{"en": bytes, "de": bytes}``.

    Raises:
      ModuleNotFoundError: preparing needs ``importlib_resources`` (see below) and it is missing.
    """
    try:
        sources = tfds.data_source(
            WMT14_NAME,
            split=list(WMT14_SPLITS),
            data_dir=data_dir,
            download=download,
            builder_kwargs={"file_format": "array_record"},
        )
    except ModuleNotFoundError as error:
        if error.name != "importlib_resources":
            raise
        # TFDS 4.9.10 imports it to locate a builder's checksums, but declares it only for Python < 3.9.
        raise ModuleNotFoundError(
            "Preparing WMT14 with tensorflow-datasets 4.9.10 needs `pip install importlib_resources`.",
            name=error.name,
        ) from error
    return dict(zip(WMT14_SPLITS, sources, strict=True))
