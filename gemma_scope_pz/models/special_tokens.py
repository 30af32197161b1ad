"""Gemma 3 vocabulary constants: special token ids and SentencePiece piece conventions.

Shared by the tokenizer (:mod:`gemma_scope_pz.models.tokenizer`), the GGUF vocabulary
converter (:mod:`gemma_scope_pz.models.gguf_vocab`) and the adapter for ``gemma`` library
tokenizers (:mod:`gemma_scope_pz.models.gemma_library_tokenizer`).
"""

from __future__ import annotations

import re

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
START_OF_TURN_ID = 105
END_OF_TURN_ID = 106
GEMMA3_VOCAB_SIZE = 262144

# The pieces a Gemma 3 vocabulary must have at the fixed special ids.
EXPECTED_PIECES = {
    PAD_ID: "<pad>",
    EOS_ID: "<eos>",
    BOS_ID: "<bos>",
    START_OF_TURN_ID: "<start_of_turn>",
    END_OF_TURN_ID: "<end_of_turn>",
}
# Pieces that are true control tokens (never parsed from text); Gemma's tokenizer.model types
# every other special piece (turn markers, "<unusedN>") USER_DEFINED.
CONTROL_PIECES = frozenset({"<pad>", "<eos>", "<bos>", "<mask>"})
# SentencePiece's whitespace symbol "▁" (U+2581), which stands for a space inside pieces.
SPACE_SYMBOL = "\u2581"
# Byte-fallback pieces such as "<0x0A>"; group 1 is the byte in hex.
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
