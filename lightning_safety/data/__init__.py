"""Chat SFT data: sources, chat formatting with response-only labels, attack mixing, datamodule."""
