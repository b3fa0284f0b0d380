"""Defaults of the experiment config format; each file in experiments/ starts from these and overrides.

Every field carries a one-line comment. The model section mirrors ``attn_jax.TransformerConfig`` (the
vocabulary size comes from the tokenizer, so it is not set here).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Paper defaults for training, evaluation and parallelism; model and data left to the experiment."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds parameter init, dropout and data order
    c.task = "translation"  # "translation" (encoder-decoder) or "lm" (decoder-only)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100_000  # optimiser updates (paper base: 100k)
    c.train.warmup_steps = 4000  # linear warm-up of the rsqrt schedule (paper: 4000)
    c.train.learning_rate_scale = 1.0  # multiplies d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    c.train.b1 = 0.9  # Adam beta1 (paper)
    c.train.b2 = 0.98  # Adam beta2 (paper)
    c.train.eps = 1e-9  # Adam epsilon (paper)
    c.train.label_smoothing = 0.1  # epsilon_ls (paper §5.4)
    c.train.grad_clip_norm = 0.0  # clip the global gradient norm; 0 = off (paper)
    c.train.weight_decay = 0.0  # decoupled weight decay; 0 = plain Adam (paper)
    c.train.accumulation_steps = 1  # micro-batches per update; steps, schedule and checkpoints count updates
    c.train.log_every = 50  # steps between metric fetches (the host never waits on the device in between)
    c.train.eval_every = 1000  # steps between validation loss/accuracy/perplexity (cheap: no decoding)
    c.train.bleu_every = 0  # steps between validation BLEU (beam search) during training; 0 = at every eval_every
    c.train.checkpoint_every = 1000  # steps between checkpoints (always one at the end)
    c.train.keep_checkpoints = 5  # newest checkpoints kept (paper averages the last 5 for base)
    c.train.keep_best = 1  # best checkpoints by validation BLEU kept besides those
    c.train.nonfinite = "raise"  # on a NaN/Inf loss or gradient: "raise" (stop, name the step) or "skip"
    c.train.max_consecutive_skips = 10  # with "skip": stop after this many non-finite steps in a row
    c.train.time_budget_minutes = 0.0  # stop (and checkpoint) after this long; 0 = no limit
    c.train.decay_to_budget = False  # multiply the learning rate by the budget left: linear to 0 at its end
    c.train.cooldown_steps = 0  # multiply the learning rate by a linear ramp to 0 over the last N of train.steps
    c.train.profile_steps = ()  # (start, stop): jax.profiler trace of updates start+1..stop into DIR/profile

    c.eval = ml_collections.ConfigDict()
    c.eval.beam_size = 4  # paper: 4
    c.eval.alpha = 0.6  # length penalty ((5 + len) / 6)^alpha (paper: 0.6)
    c.eval.extra_length = 50  # maximum output length = input length + this (paper: 50)
    c.eval.bleu_examples = 500  # validation sentences translated at each evaluation during training; 0 = loss only
    c.eval.batch_size = 64  # sentences per decoding batch
    c.eval.num_samples = 5  # sample translations printed and logged
    c.eval.attention_plots = 3  # validation sentences whose attention is plotted at the end
    c.eval.average_last = 0  # evaluate the average of the last N checkpoints at the end (paper: 5); 0 = off
    c.eval.beam_sizes = ()  # with alphas: candidates tried on validation at the end, the best used for test
    c.eval.alphas = ()  # length penalties tried with beam_sizes; () = only eval.alpha

    c.parallel = ml_collections.ConfigDict()
    c.parallel.strategy = "jit"  # "jit" (sharded, default) or "pmap" (classic data parallelism)
    c.parallel.data = -1  # mesh axis sizes; -1 = all remaining devices
    c.parallel.fsdp = 1  # parameters sharded along d_model, batch along this axis too
    c.parallel.tensor = 1  # heads, FFN hidden units and vocabulary split across this axis
    # Multi-host: True calls jax.distributed.initialize(), which finds the coordinator itself on TPU pods, SLURM
    # and Open MPI; elsewhere give the three fields below (or JAX_COORDINATOR_ADDRESS), one launch per host.
    c.parallel.distributed = False
    c.parallel.coordinator_address = ""  # "host:port" of process 0; "" = detect
    c.parallel.num_processes = 0  # 0 = detect
    c.parallel.process_id = -1  # -1 = detect
    return c


def model_config(**overrides) -> ml_collections.ConfigDict:
    """``TransformerConfig`` fields (paper base) minus the vocabulary size; see attn_jax/model_config.py.

    ``family`` picks the model (``attn_jax.families``). The recurrent families read ``d_model`` (their decoder
    state), ``dropout_rate``, ``max_len``, ``pad_id``, ``dtype`` and the ``rnn`` sub-section, and ignore the
    Transformer's sizes; the Transformer ignores ``rnn``.
    """
    model = ml_collections.ConfigDict()
    model.family = "transformer"  # "transformer", "rnnsearch" (Bahdanau et al. 2014) or "rnn_encdec" (Cho et al.)
    model.d_model = 512  # D = d_model (recurrent families: the decoder's GRU state, the paper's n)
    model.num_heads = 8  # N = h
    model.num_kv_heads = ml_collections.config_dict.placeholder(int)  # K; None = N (paper)
    model.head_dim = ml_collections.config_dict.placeholder(int)  # H = d_k = d_v; None = d_model / h
    model.d_ff = 2048  # F = d_ff
    model.num_encoder_layers = 6  # encoder depth
    model.num_decoder_layers = 6  # decoder depth
    model.max_len = 256  # longest sequence the model accepts
    model.positions = "sinusoidal"  # or "learned"
    model.dropout_rate = 0.1  # P_drop
    model.attention_dropout_rate = 0.0  # dropout on attention weights (not in the paper)
    model.activation_dropout_rate = 0.0  # dropout on the FFN's inner activation (fairseq's; not in the paper)
    model.word_dropout_rate = 0.0  # drop whole source/decoder-input tokens in training (Sennrich & Zhang 2019)
    model.word_dropout_mode = "zero"  # a dropped token's embedding is zeroed ("zero") or replaced by unk_id ("unk")
    model.unk_id = 3  # the unknown token's id ("unk" word dropout), the tokenizer's UNK_ID
    model.encoder_layerdrop = 0.0  # LayerDrop (Fan et al. 2019): chance of skipping each encoder layer in training
    model.decoder_layerdrop = 0.0  # the same for each decoder layer (Araabi & Monz 2020: 0.2)
    model.share_embeddings = True  # source and target share one table (needs a shared vocabulary)
    model.tie_output_embedding = True  # logits through the target embedding
    model.scale_embeddings = True  # embeddings * sqrt(d_model)
    model.norm_first = False  # pre-norm instead of the paper's post-norm
    model.final_norm = ml_collections.config_dict.placeholder(bool)  # LayerNorm after each stack; None = norm_first
    model.attention_bias = True  # biases in the attention projections
    model.layer_norm_epsilon = 1e-6  # layer-norm epsilon
    model.pad_id = 0  # padding token id
    model.scan_layers = True  # lax.scan over layers (compile time flat in depth)
    model.remat = False  # recompute activations in the backward pass
    model.attention_implementation = ml_collections.config_dict.placeholder(str)  # None = best available
    model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators; "float64" needs jax_enable_x64)
    model.rnn = ml_collections.ConfigDict()  # read by the recurrent families only; None = derived from d_model
    model.rnn.embed_dim = ml_collections.config_dict.placeholder(int)  # M, word embeddings; None = d_model
    model.rnn.encoder_dim = ml_collections.config_dict.placeholder(int)  # E per direction; None = d_model (dot: /2)
    model.rnn.alignment_dim = ml_collections.config_dict.placeholder(int)  # A, additive score's width; None = d_model
    model.rnn.maxout_dim = ml_collections.config_dict.placeholder(int)  # R, readout maxout units; None = d_model / 2
    model.rnn.score = "additive"  # rnnsearch's alignment: "additive" (Bahdanau), "dot" or "general" (Luong 2015)
    model.rnn.reset_after = False  # GRU reset gate after U s (cuDNN/Flax) instead of before (the paper)
    model.rnn.reverse_source = False  # rnn_encdec reads the source backwards (Sutskever et al. 2014)
    model.update(overrides)
    return model


def data_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults of ``config.data``: which dataset, its tokenizer and how it is batched."""
    data = ml_collections.ConfigDict()
    data.name = "ding_en_de"  # "ding_en_de", "wmt14_translate/de-en" or "copy"
    data.data_dir = ""  # TFDS data dir; "" = $TFDS_DATA_DIR when set, else data_cache/tfds
    data.ding_file = ""  # a manually downloaded Ding de-en file; "" = find or fetch with apt-get download
    data.phrases = False  # ding_en_de: add ~53k multi-word phrase pairs to the training split
    data.lexicon_ratio = 0.0  # ding_en_de: share of training pairs drawn from dictionary entries (0 = sentences only)
    data.lexicon_entries = "all"  # which entries: "words" (headwords, inflections), "phrases" or "all"
    data.bidirectional = False  # also train target->source: pairs reversed, a target-language tag ("<2de>") on sources
    data.source_key = "en"  # feature translated from
    data.target_key = "de"  # feature translated to (and the language-model text)
    data.vocab_size = 8000  # shared SentencePiece vocabulary (paper: 37000 BPE for EN-DE)
    data.tokenizer_type = "bpe"  # "bpe" (as the paper's byte-pair encoding) or "unigram"
    data.tokenizer_examples = 1_000_000  # random training pairs the tokenizer learns from (bounds its memory)
    data.max_length = 64  # tokens per side including EOS; longer pairs are dropped or truncated
    data.overlong = "drop"  # "drop" or "truncate" over-long training pairs (always counted)
    data.invalid_utf8 = "replace"  # "replace" (U+FFFD, counted) or "error" (stop, naming the record)
    data.tokens_per_batch = 4096  # padded tokens per batch and side (paper: ~25000)
    data.eval_tokens_per_batch = 2048  # the same for evaluation batches
    data.num_threads = 2  # threads preparing batches ahead of the step
    data.packing = False  # pack several pairs per row (segment ids, positions) instead of length buckets
    data.worker_count = 0  # Grain worker processes assembling training batches; 0 = num_threads threads here
    data.in_memory_mb = 256  # training ids read into memory once when they fit in this many MB; 0 = read files
    data.prepared_dir = ""  # cache of the ids encoded once per (data set, tokenizer); "" = WORKDIR/prepared
    data.prepare_workers = 0  # processes encoding the corpus into ids; 0 = one per CPU core
    data.examples_per_shard = 100_000  # pairs per prepared ArrayRecord file (the unit of parallel, resumable work)
    data.update(overrides)
    return data


def copy_task_config(**overrides) -> ml_collections.ConfigDict:
    """``config.data.copy``: the synthetic copy/reverse task (no files, no tokenizer)."""
    copy = ml_collections.ConfigDict()
    copy.vocab_size = 32  # ids 4..31 are tokens, 0-3 are pad/eos/bos/unk
    copy.min_length = 4  # shortest sequence
    copy.max_length = 12  # longest sequence
    copy.reverse = False  # target = reversed source instead of a copy
    copy.train_examples = 20_000  # training sequences
    copy.eval_examples = 256  # held-out validation and test sequences each
    copy.seed = 0  # seed of the data
    copy.update(overrides)
    return copy
