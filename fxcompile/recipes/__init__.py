"""Recipes: several fxcompile steps run as one job (compress: prune -> distill -> int8 -> backend)."""
