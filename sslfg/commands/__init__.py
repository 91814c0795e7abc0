"""The commands: each module's docstring is its --help, `main(argv)` runs it, `cli` is its console command."""
