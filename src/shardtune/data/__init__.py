"""Data preparation: row formats, chat templates, tokenization, packing, the prepare step."""
