"""The commands: each module's docstring is its --help, `main(argv)` runs it (`sslfg.entrypoints` starts it)."""
