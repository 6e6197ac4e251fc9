"""Subcommands of the relay CLI; each module has register(subparsers) and run handlers."""
