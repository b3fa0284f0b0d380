"""The ``ding_en_de`` TFDS dataset: English-German sentence pairs from the Ding dictionary.

The source is the file ``usr/share/trans/de-en`` of Debian's package ``trans-de-en`` (GPL 2 or later; it
is read at build time and never stored in this repository). ``attn_jax.data.ding_parser`` says which
entries become pairs and how the splits are drawn. The builder writes ArrayRecord files, read back with
``tfds.data_source`` without TensorFlow:

    sources = ding_sources(data_dir="/tmp/tfds")  # builds once, then reads
    sources["train"][0]  # {"en": b"...", "de": b"..."}
    ding_sources(data_dir="/tmp/tfds", lexicon="all")["lexicon"]  # dictionary entries, a source of their own

Builder configs: ``sentences`` (the default), ``sentences_and_phrases`` (phrase pairs added to the training
split) and ``sentences_and_lexicon``: the same sentence splits as ``sentences`` plus the splits
``lexicon_words`` and ``lexicon_phrases`` (``ding_parser.lexicon_splits``: none matches a held-out sentence),
which a run mixes into its training pairs at a ratio of its own (``config.data.lexicon_ratio``).

The ``de-en`` file is taken from, in order: an explicit ``ding_file``; ``DIR/de-en`` in the TFDS manual
dir (``data_dir/downloads/manual`` unless a ``DownloadConfig`` says otherwise); ``cache_dir/de-en``,
fetched there with ``apt-get download`` and ``dpkg -x`` when missing (``fetch_ding_file``).
"""

import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import tensorflow_datasets as tfds
from etils import epath

from attn_jax.data.ding_parser import LEXICON_SPLITS, SPLITS, DingPair, lexicon_splits, parse_ding, split_pairs
from attn_jax.data.text import DataError

DING_PACKAGE = "trans-de-en"
# Where the dictionary lies inside the Debian package.
DING_PATH_IN_PACKAGE = "usr/share/trans/de-en"
DING_FILE_NAME = "de-en"
# Relative to the working directory unless absolute; the repository ignores /data_cache/.
DEFAULT_CACHE_DIR = pathlib.Path(os.environ.get("ATTN_JAX_DATA_CACHE", "data_cache")) / "ding"

_FETCH_HELP = f"""\
The Ding dictionary file is missing. Get it from Debian's `{DING_PACKAGE}` package, e.g.
    apt-get update   # as root, only if `apt-cache show {DING_PACKAGE}` finds nothing
    apt-get download {DING_PACKAGE} && dpkg -x {DING_PACKAGE}_*.deb ding_pkg
then pass ding_file="ding_pkg/{DING_PATH_IN_PACKAGE}", or copy that file to CACHE_DIR/{DING_FILE_NAME}
or to the TFDS manual dir as {DING_FILE_NAME}."""


class DingFileNotFoundError(FileNotFoundError, DataError):
    """The ``de-en`` file is neither given, in the manual dir, in the cache, nor fetchable."""


def fetch_ding_file(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> pathlib.Path:
    """Returns ``cache_dir/de-en``, first downloading and unpacking ``trans-de-en`` if it is absent.

    Needs ``apt-get`` and ``dpkg`` (Debian or Ubuntu) with package lists that know ``trans-de-en``
    (``apt-get update`` as root when they are empty); the download itself needs no root.

    Args:
      cache_dir: folder to keep the file in; created when missing.

    Returns:
      The path of the ``de-en`` file.

    Raises:
      DingFileNotFoundError: the file is absent and cannot be fetched; the message says how to get it.

    Example:
      >>> import tempfile, pathlib
      >>> cache = pathlib.Path(tempfile.mkdtemp())
      >>> _ = (cache / "de-en").write_text("A :: B\\n")
      >>> fetch_ding_file(cache) == cache / "de-en"
      True
    """
    cache_dir = pathlib.Path(cache_dir)
    target = cache_dir / DING_FILE_NAME
    if target.is_file():
        return target
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise DingFileNotFoundError(f"{' and '.join(missing)} not found.\n{_FETCH_HELP}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        _run(["apt-get", "download", DING_PACKAGE], cwd=scratch)
        (deb,) = pathlib.Path(scratch).glob(f"{DING_PACKAGE}_*.deb")
        _run(["dpkg", "-x", deb.name, "root"], cwd=scratch)
        extracted = pathlib.Path(scratch, "root")
        # Keep the licence next to the data it covers.
        copyright_file = extracted / "usr/share/doc" / DING_PACKAGE / "copyright"
        if copyright_file.is_file():
            shutil.copyfile(copyright_file, cache_dir / "copyright")
        # A rename is atomic, so a concurrent reader never sees half a file.
        os.replace(extracted / DING_PATH_IN_PACKAGE, target)
    logging.info("Fetched the Ding dictionary from %s into %s", DING_PACKAGE, target)
    return target


def _run(command: Sequence[str], *, cwd: str) -> None:
    """Runs a fetch step, turning its failure into a `DingFileNotFoundError` with the how-to."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DingFileNotFoundError(
            f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stderr.strip()}\n{_FETCH_HELP}"
        )


def find_ding_file(
    ding_file: str | os.PathLike | None = None,
    *,
    manual_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
) -> pathlib.Path:
    """Finds the ``de-en`` file: explicit path, else manual dir, else cache (fetched when absent).

    Args:
      ding_file: explicit path of the ``de-en`` file; must exist when given.
      manual_dir: a folder that may hold ``de-en``.
      cache_dir: folder for ``fetch_ding_file``; ``None`` forbids fetching.

    Returns:
      The path of the file.

    Raises:
      DingFileNotFoundError: nothing found and fetching is off or failed.

    Example:
      >>> import tempfile, pathlib
      >>> manual = pathlib.Path(tempfile.mkdtemp())
      >>> _ = (manual / "de-en").write_text("A :: B\\n")
      >>> find_ding_file(manual_dir=manual, cache_dir=None) == manual / "de-en"
      True
    """
    if ding_file is not None:
        path = pathlib.Path(ding_file)
        if not path.is_file():
            raise DingFileNotFoundError(f"ding_file={str(path)!r} does not exist.\n{_FETCH_HELP}")
        return path
    if manual_dir is not None and (pathlib.Path(manual_dir) / DING_FILE_NAME).is_file():
        return pathlib.Path(manual_dir) / DING_FILE_NAME
    if cache_dir is None:
        raise DingFileNotFoundError(f"No {DING_FILE_NAME} in manual_dir={manual_dir!r}.\n{_FETCH_HELP}")
    return fetch_ding_file(cache_dir)


class DingEnDeConfig(tfds.core.BuilderConfig):
    """A ``ding_en_de`` variant.

    Attributes:
      phrases: add multi-word phrase pairs to the training split (evaluation splits stay sentences).
      lexicon: add the splits ``lexicon_words`` and ``lexicon_phrases`` (dictionary entries, kept apart).
    """

    def __init__(self, *, phrases: bool, lexicon: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.phrases, self.lexicon = phrases, lexicon


class DingEnDe(tfds.core.GeneratorBasedBuilder):
    """English-German sentence pairs from the Ding dictionary, as ArrayRecord.

    Extra constructor arguments (also through ``tfds.data_source(..., builder_kwargs=...)``):
    ``ding_file`` (explicit path of ``de-en``) and ``cache_dir`` (where ``fetch_ding_file`` keeps it;
    ``None`` forbids fetching). ``file_format`` defaults to ``"array_record"``.
    """

    # Bump when the parser's rules change: TFDS reuses prepared data of an unchanged version.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Sentences (and optional phrases) of Ding 'devel 2023-01-30'."}
    BUILDER_CONFIGS = [
        DingEnDeConfig(name="sentences", phrases=False, description="Full-sentence pairs only."),
        DingEnDeConfig(
            name="sentences_and_phrases",
            phrases=True,
            description="Sentence pairs, plus multi-word phrase pairs in the training split.",
        ),
        DingEnDeConfig(
            name="sentences_and_lexicon",
            phrases=False,
            lexicon=True,
            description="Sentence pairs, plus word and phrase entries as splits of their own (lexicon_words, "
            "lexicon_phrases), none matching a held-out sentence.",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = _FETCH_HELP
    # TFDS 4.9.10 would find this file through `importlib_resources`, which it declares only for
    # Python < 3.9, so preparing fails without it; naming the file here skips that lookup.
    code_path = epath.Path(__file__)

    def __init__(
        self,
        *,
        ding_file: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
        **kwargs: Any,
    ):
        kwargs.setdefault("file_format", "array_record")
        self._ding_file = ding_file
        self._cache_dir = cache_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs would look for metadata files beside this module.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({"en": tfds.features.Text(), "de": tfds.features.Text()}),
            supervised_keys=("en", "de"),
            homepage="https://dict.tu-chemnitz.de/",
            license="GPL-2.0-or-later",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:  # TFDS raises it when the manual dir is absent or empty
            manual_dir = None
        path = find_ding_file(self._ding_file, manual_dir=manual_dir, cache_dir=self._cache_dir)
        config = self.builder_config
        with open(path, "rb") as lines:
            pairs, stats = parse_ding(lines, phrases=config.phrases or config.lexicon, words=config.lexicon)
        logging.info("Parsed %s: %s", path, stats)
        # Without the phrases config, phrases (and words) stay out of the sentence splits.
        splits: dict[str, list[DingPair]] = split_pairs(
            pairs if config.phrases else [pair for pair in pairs if pair.kind == "sentence"]
        )
        if config.lexicon:
            splits |= lexicon_splits(pairs, held_out=splits["validation"] + splits["test"])
        return {name: self._generate_examples(split) for name, split in splits.items()}

    def _generate_examples(self, pairs: list[DingPair]) -> Iterator[tuple[str, dict[str, str]]]:
        for pair in pairs:
            # The key fixes the shuffled on-disk order, so it depends on the pair alone.
            key = hashlib.sha256(f"{pair.en}\t{pair.de}".encode()).hexdigest()
            yield key, {"en": pair.en, "de": pair.de}


# Which lexicon splits each choice of ``config.data.lexicon_entries`` reads.
LEXICON_ENTRIES = {
    "words": LEXICON_SPLITS["word"],
    "phrases": LEXICON_SPLITS["phrase"],
    "all": "+".join(LEXICON_SPLITS.values()),
}


def ding_sources(
    data_dir: str | os.PathLike | None = None,
    *,
    phrases: bool = False,
    lexicon: str | None = None,
    ding_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
    download: bool = True,
) -> Mapping[str, grain.sources.RandomAccessDataSource]:
    """Random-access sources for the ``ding_en_de`` splits, building the dataset on first use.

    Args:
      data_dir: TFDS data dir; ``None`` means TFDS's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      phrases: use the ``sentences_and_phrases`` config instead of ``sentences``.
      lexicon: ``"words"``, ``"phrases"`` or ``"all"`` (``LEXICON_ENTRIES``): use the ``sentences_and_lexicon``
        config and add those entries as the source ``"lexicon"``; ``None`` adds none.
      ding_file: explicit path of the ``de-en`` file (see `find_ding_file`).
      cache_dir: where to keep or fetch the file; ``None`` forbids fetching.
      download: build the dataset when absent; if False it must already exist.

    Returns:
      ``{"train", "validation", "test"}`` (and ``"lexicon"``) to sources whose items are
      ``{"en": bytes, "de": bytes}``.

    Raises:
      ValueError: both ``phrases`` and ``lexicon``, or an unknown ``lexicon``.
    """
    if lexicon is not None and lexicon not in LEXICON_ENTRIES:
        raise ValueError(f"lexicon must be one of {tuple(LEXICON_ENTRIES)} or None, got {lexicon!r}")
    if phrases and lexicon is not None:
        raise ValueError("phrases (in the training split) and lexicon (a source of its own) exclude each other")
    config = "sentences_and_lexicon" if lexicon else "sentences_and_phrases" if phrases else "sentences"
    names = {split: split for split in SPLITS} | ({"lexicon": LEXICON_ENTRIES[lexicon]} if lexicon else {})
    sources = tfds.data_source(
        f"ding_en_de/{config}",
        split=list(names.values()),
        data_dir=data_dir,
        download=download,
        builder_kwargs={"ding_file": ding_file, "cache_dir": cache_dir, "file_format": "array_record"},
    )
    return dict(zip(names, sources, strict=True))
