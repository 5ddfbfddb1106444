"""Stage 2b, from scores to a pruned checkpoint. `selection` turns a score file into kept expert
ids per layer (metric, domain mix, routing-group policy, feasibility checked before any work),
`cprune` is the clustering alternative (C-Prune, with its global cross-layer step), `export`
streams the pruned HF checkpoint byte for byte, and `preflight` checks it against the serving
engines' conditions. No Megatron and no model in memory."""
