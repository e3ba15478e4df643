"""Entry points: the `simplepose` command line and job configurations."""
