"""Server-side tool calls (LAMPS, arXiv 2410.18248): the tool registry, per-tool duration
history and the loop that pauses a request for its call inside the engine."""
