"""Training code: supervised data loading (annotations, chat templating, label masking, truncation,
batching and length-grouped sampling) for the Slow-Fast video LLM."""
