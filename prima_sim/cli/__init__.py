"""Command-line interface of prima-sim (one module per subcommand)."""
