"""The application on top: the command line, the demo and checkpoint evaluation."""
