"""The results tables: reproductions and the README's generated sections."""
