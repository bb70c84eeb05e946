"""Entry points: the command line, the demo, notebook helpers and the notebook renderer."""
