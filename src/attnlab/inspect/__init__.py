"""The inspection layer: worked examples step by step, attention maps, plots and the HTML report."""
