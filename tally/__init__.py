"""Tally: the command line, settings, errors and datasource specs every process shares."""
