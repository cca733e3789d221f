"""Loss functions. Each is pure: loss_fn(params, batch, rng) -> (loss_sum, weight, metrics), where
metrics maps a name to a (sum, count) pair. The train step sums across microbatches and devices and
divides once, so nothing depends on how examples fall into microbatches."""
