"""Stage 3, how good a pruned model is. Per-domain NLL / perplexity of a checkpoint in Megatron
(`evaluation`), routing drift of a pruned export on held-out text (`routing_drift`), and the
comparison grid of every criterion at several M (`compare` runs it and keeps a resume store,
`measures` holds KL / top-1 / perplexity and the top-M overlaps, `report` writes the tables and
plots)."""
