"""Graph passes: graph -> graph and graph -> assignment (cost graphs, partitioners)."""
