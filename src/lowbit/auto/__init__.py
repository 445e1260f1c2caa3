"""Budgeted auto-compression: choose a format per tensor so that the model meets a size (or speed)
budget with the least predicted damage. `knapsack` is the exact allocator."""
