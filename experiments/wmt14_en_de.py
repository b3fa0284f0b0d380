"""WMT 2014 English -> German, as the paper trains it (§5, Table 3).

    attn-jax prepare --config experiments/wmt14_en_de.py:size=base --workdir runs/wmt14_base   # optional: train does it
    attn-jax train --config experiments/wmt14_en_de.py:size=base --workdir runs/wmt14_base
    attn-jax train --config experiments/wmt14_en_de.py:size=big --workdir runs/wmt14_big
    attn-jax average --workdir runs/wmt14_base --last 5     # the paper averages the last 5 (base) / 20 (big)

Shared 37k-token BPE SentencePiece vocabulary, batches of ~25k source + ~25k target tokens, Adam
(0.9, 0.98, 1e-9) with warm-up 4000 and the rsqrt schedule, P_drop 0.1 (base) / 0.3 (big), label
smoothing 0.1, beam 4, length penalty 0.6, maximum output length input + 50. Base: 100k steps, big: 300k.
Expected (paper, Table 2, newstest2014): 27.3 (base) and 28.4 (big) BLEU as the paper measured it: Moses-tokenized
with compound splitting (tensor2tensor's get_ende_bleu.sh), reported here as ``bleu_compound_split``; sacreBLEU on
detokenized text (``bleu``) runs about 1 lower. The test split is TFDS's full newstest2014 (3,003 sentences), not
the filtered 2,737 of sacreBLEU's ``wmt14``. 12 h (base) / 3.5 days (big) on 8 P100.

The data comes from TFDS's wmt14_translate/de-en builder (downloads ~1.5 GB on first use, into $TFDS_DATA_DIR when
set). Preparation trains the tokenizer on a random sample of 1M pairs and encodes the 4.5M pairs once, one process
per core; training then reads ids, packed several pairs per row (``data.packing``; padding under 5%, where length
buckets pad about a quarter) and assembled in Grain worker processes. Packing is a deviation from the paper's
length-bucketed batches; its ~25k real target tokens per batch are closer to the paper's "approximately 25000"
than buckets' 25k padded ones. ``data.packing=False`` brings the buckets back.

Compute is bfloat16 with float32 parameters on a GPU or TPU, float32 on a CPU, decided when the config is made
(without starting JAX's backends, which a multi-host run must not do before ``jax.distributed.initialize``).
``runlocal`` shrinks batches and steps for a smoke test on one machine.
"""

import importlib.metadata
import os

from attn_jax import defaults
from attn_jax.config import ConfigError, parse_arg

# Packages that give JAX a GPU or TPU backend, and the device files the chips appear as.
_ACCELERATOR_PACKAGES = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm60-plugin", "libtpu", "libtpu-nightly")
_ACCELERATOR_DEVICES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0", "/dev/kfd")


def on_accelerator() -> bool:
    """Whether JAX will compute on a GPU or TPU, judged without initialising its backends."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("", "cpu")
    installed = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()}
    return bool(installed & set(_ACCELERATOR_PACKAGES)) and any(map(os.path.exists, _ACCELERATOR_DEVICES))


def get_config(arg=None):
    args = parse_arg(arg, size="base", runlocal=False)
    if args.size not in ("base", "big"):
        raise ConfigError(f"experiment argument size must be 'base' or 'big', got {args.size!r}")
    big = args.size == "big"
    accelerator = on_accelerator()
    c = defaults.base_config()
    c.data = defaults.data_config(
        name="wmt14_translate/de-en", vocab_size=37000, max_length=256, tokens_per_batch=25_000,
        eval_tokens_per_batch=8192, num_threads=8, packing=True, worker_count=8 if accelerator else 0,
    )  # fmt: skip
    c.model = defaults.model_config(
        d_model=1024 if big else 512, num_heads=16 if big else 8, d_ff=4096 if big else 2048,
        dropout_rate=0.3 if big else 0.1, max_len=512, dtype="bfloat16" if accelerator else "float32",
    )  # fmt: skip
    c.train.steps = 300_000 if big else 100_000  # paper: 100k (base), 300k (big)
    c.train.keep_checkpoints = 20 if big else 5  # the checkpoints that get averaged
    c.train.checkpoint_every = 1000  # paper: every 10 minutes
    c.eval.bleu_examples = 1000  # newstest2013 subset during training
    if args.runlocal:
        c.data.tokens_per_batch = 2048
        c.data.worker_count = 0
        c.train.steps = 200
        c.train.eval_every = 100
        c.train.checkpoint_every = 100
        c.eval.bleu_examples = 32
    return c
