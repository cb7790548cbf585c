"""Stage 2, rendering: chat templates and tokenizers turn a record into token ids and a loss mask."""
