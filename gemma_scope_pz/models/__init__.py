"""Gemma 3 text models in Penzai: where weights come from, how they become layers, how they run.

* ``sources``: one resolver for checkpoint sources (offline default, ``hf:``, ``kaggle:``, paths);
* ``checkpoints/``: the canonical parameter layout and the GGUF, Hugging Face and orbax readers;
* ``config``, ``builder``, ``gemma3``: presets, the Penzai tree, ``Gemma3LM`` and ``forward``;
* ``inputs``: the one input convention of the runners (text, ids, ragged lists, arrays) and
  length bucketing; ``sampling``: KV-cached generation; ``stateful``: models holding state;
* ``tokenizer`` (with ``gguf_vocab``, ``tokenizer_cache``, ``special_tokens``, ``chat_template``,
  ``gemma_library_tokenizer``); ``fingerprint``: a model's identity by its weights.
"""
