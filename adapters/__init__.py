"""Model-family adapters: where the blocks are in a given model, and how to read its noise level."""
