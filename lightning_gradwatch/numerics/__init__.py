"""Pure tensor math, free of Lightning: norm kinds and their combinable partials, gains and categories, gradient statistics, the noise-scale estimator."""
