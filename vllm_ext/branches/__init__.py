"""Multi-branch requests (DUCHESS, arXiv 2509.24957): plans in `rules`, the engine side in
`runner`, counters in `metrics`."""
