"""Thin entry scripts: parse the command line, load the config, call one library function."""
